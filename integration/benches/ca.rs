//! What a workload certificate costs from `ambit ca`, against what it cost when each agent
//! signed it itself: certificates per second and the latency of `CertificateProvider::issue`,
//! with one caller and with 16 at once, for
//!
//! - `local`: `LocalCa` in this process, with the same CA files (the baseline);
//! - `ca node`: the agent's client (`CaClient`) of a node agent asking for a pod of its node:
//!   the CA reviews its token, gets its pod, lists its node's pods, then signs;
//! - `ca own`: the same client with a workload's token asking for its own identity: a token
//!   review, no pod lookup, then the signature;
//!
//! and the CPU each process spends per certificate. `ambit ca` and `fake-apiserver` run as
//! child processes on loopback; the API server is the fake, so its share is not a real API
//! server's, and the point is ambit's own cost and its ratio to local signing. Needs no root,
//! and a release build of the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench ca`
//!
//! The bench runs the `ambit` next to it; `AMBIT_BIN=/abs/path/target/release/ambit` names
//! another one.

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_identity::{CertificateProvider, Identity, LocalCa};
use ambit_integration::{ApiServerProcess, CaHarness, CaProcess, TestCa};
use ambit_test_support::measure::{self, Comparison};

/// Callers at once in the concurrent runs.
const CALLERS: usize = 16;
/// Unmeasured requests first: connections to the CA and to the API server are made then.
const WARMUP: Duration = Duration::from_millis(500);
/// How long each run issues certificates.
const RUN: Duration = Duration::from_secs(3);
/// Nodes of the cluster, and pods of the namespace `shop` on each: what the CA's list of the
/// node's pods returns.
const NODES: usize = 10;
const PODS_PER_NODE: usize = 30;
/// What the agents ask for: the identity of a pod on node1.
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// The lifetime asked for, the CA's default.
const TTL: Duration = CaProcess::DEFAULT_TTL;
/// The unit of the CPU times in `/proc/<pid>/stat`: `USER_HZ`, 100 on Linux whatever the
/// kernel's own tick rate.
const USER_HZ: u64 = 100;

const TOKENS: &str = "
- token: node1
  username: system:serviceaccount:ambit-system:ambit
  extra:
    authentication.kubernetes.io/pod-name: [ambit-node1]
    authentication.kubernetes.io/pod-uid: [uid-ambit-node1]
  audiences: [istio-ca]
- token: web
  username: system:serviceaccount:shop:web
  extra:
    authentication.kubernetes.io/pod-name: [web]
    authentication.kubernetes.io/pod-uid: [uid-web]
  audiences: [istio-ca]
";

/// Who asks, for the same identity.
#[derive(Debug, Clone, Copy)]
enum Subject {
    Local,
    NodeAgent,
    Workload,
}

impl Subject {
    const ALL: [Self; 3] = [Self::Local, Self::NodeAgent, Self::Workload];

    fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::NodeAgent => "ca node",
            Self::Workload => "ca own",
        }
    }
}

/// One run: each call's latency, sorted, and how long the run took.
struct Run {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn p50(&self) -> f64 {
        measure::percentile_us(&self.latencies, 0.5)
    }

    fn p99(&self) -> f64 {
        measure::percentile_us(&self.latencies, 0.99)
    }
}

/// What one subject measured.
struct Measured {
    one: Run,
    many: Run,
    /// CPU per certificate over both runs, in microseconds: this process (the agent's side),
    /// `ambit ca`, `fake-apiserver`.
    cpu: [f64; 3],
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let ca = TestCa::with_intermediate("bench").unwrap();
    let api = ApiServerProcess::start(&objects(), TOKENS)
        .await
        .unwrap_or_else(|e| panic!("starting the API server: {e:?}"));
    let harness = CaHarness::start(api, &ca, &[])
        .await
        .unwrap_or_else(|e| panic!("starting the CA: {e:?}"));
    let (ca_pid, apiserver_pid) = harness.pids();
    let pids = [std::process::id(), ca_pid, apiserver_pid];
    let identity: Identity = WEB.parse().unwrap();

    let mut measured = Vec::new();
    for subject in Subject::ALL {
        let provider: Arc<dyn CertificateProvider> = match subject {
            Subject::Local => Arc::new(
                LocalCa::load(harness.ca_dir())
                    .unwrap()
                    .with_workload_ttl(TTL),
            ),
            Subject::NodeAgent => Arc::new(harness.ca().agent_client("node1", &ca, TTL).unwrap()),
            Subject::Workload => Arc::new(harness.ca().agent_client("web", &ca, TTL).unwrap()),
        };
        let issued = provider.issue(&identity).await.unwrap();
        assert_eq!(issued.identity(), &identity, "{}", subject.label());
        measured.push(measure_subject(&provider, &identity, pids).await);
    }
    print!("{}", report(&measured));
}

/// The CPU each process used so far.
fn cpu_times(pids: [u32; 3]) -> [Duration; 3] {
    pids.map(cpu_time)
}

/// One caller, then `CALLERS` at once, each after a warm-up.
async fn measure_subject(
    provider: &Arc<dyn CertificateProvider>,
    identity: &Identity,
    pids: [u32; 3],
) -> Measured {
    issue_for(provider, identity, 1, WARMUP).await;
    let before = cpu_times(pids);
    let one = issue_for(provider, identity, 1, RUN).await;
    let between = cpu_times(pids);
    issue_for(provider, identity, CALLERS, WARMUP).await;
    let resumed = cpu_times(pids);
    let many = issue_for(provider, identity, CALLERS, RUN).await;
    let after = cpu_times(pids);
    let certificates = (one.latencies.len() + many.latencies.len()) as f64;
    let cpu = std::array::from_fn(|i| {
        let used = (between[i] - before[i]) + (after[i] - resumed[i]);
        used.as_secs_f64() * 1e6 / certificates
    });
    Measured { one, many, cpu }
}

/// `callers` tasks asking for `identity` one request after the other, for `duration`.
async fn issue_for(
    provider: &Arc<dyn CertificateProvider>,
    identity: &Identity,
    callers: usize,
    duration: Duration,
) -> Run {
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (provider, identity) = (provider.clone(), identity.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let asked = Instant::now();
                    provider.issue(&identity).await.unwrap();
                    latencies.push(asked.elapsed());
                    // The local CA signs without awaiting anything: let the other callers in.
                    tokio::task::yield_now().await;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Run { latencies, elapsed }
}

/// A row of the table: one number of a subject's measurements.
type Metric = fn(&Measured) -> f64;

fn report(measured: &[Measured]) -> String {
    let (local, subjects) = measured.split_first().unwrap();
    let labels: Vec<&'static str> = Subject::ALL.iter().skip(1).map(|s| s.label()).collect();
    let mut table = Comparison::new(Subject::Local.label(), &labels);
    let many = |what: &str| format!("{what}, {CALLERS} callers");
    let rows: [(String, Metric); 7] = [
        ("certificates/s, 1 caller".to_owned(), |m| m.one.rate()),
        ("latency p50 (us), 1 caller".to_owned(), |m| m.one.p50()),
        ("latency p99 (us), 1 caller".to_owned(), |m| m.one.p99()),
        (many("certificates/s"), |m| m.many.rate()),
        (many("latency p50 (us)"), |m| m.many.p50()),
        (many("latency p99 (us)"), |m| m.many.p99()),
        ("CPU per certificate, all processes (us)".to_owned(), |m| {
            m.cpu.iter().sum()
        }),
    ];
    for (metric, value) in rows {
        let values: Vec<f64> = subjects.iter().map(value).collect();
        table.row(&metric, value(local), &values);
    }
    let mut out = format!(
        "Workload certificates: LocalCa in process vs the agent's client of `ambit ca` on \
         loopback ({} s runs; ratio = subject / local)\n\
         ca node: a node agent asking for a pod of its node (TokenReview, GET of its pod, LIST \
         of its node's pods, sign); ca own: a workload asking for its own identity (TokenReview, \
         sign).\n\
         The API server is fake-apiserver, not a real one ({NODES} nodes, {PODS_PER_NODE} \
         minimal pods of the namespace on each); every process shares this machine's {} cores.\n",
        RUN.as_secs(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    out.push_str(&table.render());
    let _ = writeln!(
        out,
        "\nCPU per certificate by process, both runs (us)\n  {:<9} {:>12} {:>12} {:>15}",
        "", "agent side", "ambit ca", "fake-apiserver"
    );
    for (subject, m) in Subject::ALL.iter().zip(measured) {
        let [agent, ca, apiserver] = m.cpu;
        let _ = writeln!(
            out,
            "  {:<9} {agent:>12.0} {ca:>12.0} {apiserver:>15.0}",
            subject.label()
        );
    }
    out
}

/// The cluster: node agent `ambit-node1`, and on each node `PODS_PER_NODE` pods of `shop`
/// with as many service accounts; `web` is one of node1's.
fn objects() -> String {
    let pod = |name: &str, namespace: &str, node: &str, account: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}, namespace: {namespace}, uid: uid-{name}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {account}, \
             containers: [{{name: app, image: app}}]}}\n\
             status: {{phase: Running}}\n"
        )
    };
    let mut objects = pod("ambit-node1", "ambit-system", "node1", "ambit");
    objects.push_str(&pod("web", "shop", "node1", "web"));
    for node in 1..=NODES {
        // node1's web is one of its pods.
        let others = if node == 1 {
            PODS_PER_NODE - 1
        } else {
            PODS_PER_NODE
        };
        for i in 0..others {
            let name = format!("app-{node}-{i}");
            objects.push_str(&pod(&name, "shop", &format!("node{node}"), &name));
        }
    }
    objects
}

/// The CPU time, user and system, that process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces, start
    // with the third, the state; utime and stime are the 14th and 15th.
    let (_, after_name) = stat.rsplit_once(')').unwrap();
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|field| field.parse::<u64>().unwrap())
        .sum();
    Duration::from_millis(ticks * 1000 / USER_HZ)
}
