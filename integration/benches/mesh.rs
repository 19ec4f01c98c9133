//! Pod-to-pod TCP across two nodes of a namespace mesh, with each capture backend: directly,
//! between two pods outside the mesh, and through the mesh (capture, HBONE between the agents,
//! capture), on the same path in one run, the two taking turns; then the agent's footprint
//! (resident memory and threads) and the time from a pod appearing in the cluster file to its
//! capture being active, for 200 pods at once. Needs root and a release build of the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench mesh`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_agent::lab::{Cluster, InPod, read_peer_line};
use ambit_integration::agent_binary;
use ambit_test_support::measure::{self, Comparison};
use tokio::net::TcpStream;
use tokio::runtime::Handle;

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 8080;
/// Rounds of the measurements, in each of which the direct path and the mesh take turns: a
/// virtual machine's speed drifts by tens of percent within minutes, and a ratio of two paths
/// measured minutes apart would carry that drift.
const ROUNDS: usize = 5;
/// Bytes of each round's bulk transfer; the throughput is the median of the rounds'.
const BULK_BYTES: u64 = 512 << 20;
const ROUND_TRIPS: usize = 10_000;
const WARMUP: usize = 500;
const NEW_CONNECTIONS: usize = 1_000;
const HELD_CONNECTIONS: usize = 1_000;
/// Pods listed at once for the enrolment measurement.
const BURST: usize = 200;

fn main() {
    raise_fd_limit();
    // The clients on this thread and the servers on another, as apps on two nodes never share
    // a thread: two tasks on one runtime worker can trade a message without waking anyone,
    // which made the direct path's round trip flip between 24 and 60 us with the scheduler's
    // placement of its two ends.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("servers")
        .enable_all()
        .build()
        .unwrap();
    let clients = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    clients.block_on(run(servers.handle()));
}

struct Path {
    client: InPod,
    sink: SocketAddr,
    echo: SocketAddr,
}

/// What one backend's cluster measured.
struct Measured {
    /// The direct path, in the same cluster.
    direct: Numbers,
    mesh: Numbers,
    /// KiB per held tunneled connection, by node.
    memory: Vec<(&'static str, f64)>,
    /// From the file listing them to capture active, per pod, sorted.
    enrolment: Vec<Duration>,
    /// node1's agent once started, with the cluster's own pods enrolled.
    at_start: Footprint,
    /// node1's agent before the burst of pods, after the other measurements.
    before_burst: Footprint,
    /// node1's agent once the burst is captured.
    after_burst: Footprint,
}

/// An agent's resident memory and threads.
struct Footprint {
    resident_kib: u64,
    threads: u64,
}

struct Numbers {
    throughput: f64,
    round_trips: Vec<Duration>,
    connection_rate: f64,
}

async fn run(servers: &Handle) {
    let binary = agent_binary();
    assert!(
        binary.exists(),
        "build the agent first: cargo build --release -p ambit-agent"
    );
    let backends = ["nftables", "ebpf"];
    let mut measured = Vec::new();
    for backend in backends {
        measured.push(measure_backend(&binary, backend, servers).await);
    }

    // Each backend against the direct path measured in turns with it; the direct column shows
    // each run's, in the order of the backends.
    let pairs = |value: fn(&Numbers) -> f64| -> Vec<(f64, f64)> {
        measured
            .iter()
            .map(|m| (value(&m.direct), value(&m.mesh)))
            .collect()
    };
    let p50 = |n: &Numbers| measure::percentile_us(&n.round_trips, 0.5);
    let p99 = |n: &Numbers| measure::percentile_us(&n.round_trips, 0.99);
    let mut table = Comparison::new("direct", &backends);
    table.paired_row("single-stream throughput (MiB/s)", &pairs(|n| n.throughput));
    table.paired_row("1 KiB round trip p50 (us)", &pairs(p50));
    table.paired_row("1 KiB round trip p99 (us)", &pairs(p99));
    table.paired_row(
        "new connections/s (1 KiB round trip each)",
        &pairs(|n| n.connection_rate),
    );
    println!(
        "Pod to pod across two nodes, direct vs through the mesh with each capture backend \
         (one run each, taking turns with the direct path over {ROUNDS} rounds; direct = each \
         run's, ratio = backend / its direct path)"
    );
    print!("{}", table.render());
    println!("\nResident memory per held tunneled connection ({HELD_CONNECTIONS} held)");
    for (backend, run) in backends.iter().zip(&measured) {
        for (node, kib) in &run.memory {
            println!("  {backend:<9} agent {node}: {kib:.2} KiB");
        }
    }
    println!(
        "\nEnrolment of {BURST} pods listed at once, from the file change to capture active \
         (the file is polled every 200 ms)"
    );
    println!(
        "  {:<9} {:>8} {:>8} {:>8}",
        "backend", "p50 ms", "max ms", "pods/s"
    );
    for (backend, run) in backends.iter().zip(&measured) {
        let last = run.enrolment.last().copied().unwrap_or_default();
        println!(
            "  {backend:<9} {:>8.0} {:>8.0} {:>8.1}",
            measure::percentile_us(&run.enrolment, 0.5) / 1000.0,
            last.as_secs_f64() * 1000.0,
            BURST as f64 / last.as_secs_f64(),
        );
    }
    println!(
        "\nnode1's agent: resident memory (MiB) and threads when started (its own pods \
         enrolled), before the {BURST} pods (after the measurements above) and after them"
    );
    println!(
        "  {:<9} {:>8} {:>8} {:>8} {:>12} {:>9} {:>9} {:>9}",
        "backend", "start", "before", "after", "KiB per pod", "threads", "before", "after"
    );
    for (backend, run) in backends.iter().zip(&measured) {
        let (start, before, after) = (&run.at_start, &run.before_burst, &run.after_burst);
        let mib = |footprint: &Footprint| footprint.resident_kib as f64 / 1024.0;
        let per_pod = after.resident_kib.saturating_sub(before.resident_kib) as f64 / BURST as f64;
        println!(
            "  {backend:<9} {:>8.1} {:>8.1} {:>8.1} {:>12.1} {:>9} {:>9} {:>9}",
            mib(start),
            mib(before),
            mib(after),
            per_pod,
            start.threads,
            before.threads,
            after.threads,
        );
    }
}

/// Everything, in a cluster whose agents capture with `backend`.
/// The servers' apps run on `servers`.
async fn measure_backend(binary: &std::path::Path, backend: &str, servers: &Handle) -> Measured {
    let mut cluster = Cluster::builder(binary)
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("plain")
        .pod("node1", "shop", "client")
        .pod("node2", "shop", "server")
        .pod("node1", "plain", "direct-client")
        .pod("node2", "plain", "direct-server")
        .agent_args(&["--redirect", backend])
        .start()
        .await
        .unwrap();
    let pid = cluster.agent("node1").unwrap().pid();
    let at_start = footprint(pid).await;
    let mut apps = Vec::new();
    for server in ["server", "direct-server"] {
        let pod = cluster.in_pod(server).unwrap();
        let echo = servers.spawn(async move {
            let app = pod.echo(ECHO_PORT).await.unwrap();
            let sink = pod.listen(SINK_PORT).await.unwrap();
            tokio::spawn(measure::serve_sink(sink));
            app
        });
        apps.push(echo.await.unwrap());
    }
    let path = |client: &str, server: &str| Path {
        client: cluster.in_pod(client).unwrap(),
        sink: cluster.addr(server, SINK_PORT).unwrap(),
        echo: cluster.addr(server, ECHO_PORT).unwrap(),
    };
    let direct = path("direct-client", "direct-server");
    let mesh = path("client", "server");

    // Memory first: allocations of the other measurements would still be resident.
    let memory = held_connection_memory(&cluster, &mesh).await;
    let [direct, mesh] = in_turns([&direct, &mesh]).await;
    let before_burst = footprint(pid).await;
    let enrolment = enrolment(&mut cluster).await;
    let after_burst = footprint(pid).await;
    Measured {
        direct,
        mesh,
        memory,
        enrolment,
        at_start,
        before_burst,
        after_burst,
    }
}

/// The numbers of each path, over [`ROUNDS`] rounds in which the paths take turns at each
/// measurement.
async fn in_turns(paths: [&Path; 2]) -> [Numbers; 2] {
    let mut throughputs = [const { Vec::new() }; 2];
    let mut round_trips = [const { Vec::new() }; 2];
    let mut connecting = [0.0; 2];
    let mut streams = [echo_stream(paths[0]).await, echo_stream(paths[1]).await];
    for stream in &mut streams {
        measure::round_trips(stream, WARMUP, 0).await;
    }
    for _ in 0..ROUNDS {
        for (i, path) in paths.iter().enumerate() {
            throughputs[i].push(throughput(path).await);
        }
        for (i, stream) in streams.iter_mut().enumerate() {
            round_trips[i].extend(measure::round_trips(stream, 0, ROUND_TRIPS / ROUNDS).await);
        }
        for (i, path) in paths.iter().enumerate() {
            let connections = NEW_CONNECTIONS / ROUNDS;
            let rate = measure::connection_rate(connections, || echo_stream(path)).await;
            connecting[i] += connections as f64 / rate;
        }
    }
    [0, 1].map(|i| {
        let mut round_trips = std::mem::take(&mut round_trips[i]);
        round_trips.sort();
        Numbers {
            throughput: measure::median(std::mem::take(&mut throughputs[i])),
            round_trips,
            connection_rate: NEW_CONNECTIONS as f64 / connecting[i],
        }
    })
}

/// Lists `BURST` new pods of node1 in the cluster file at once and returns, for each, how long
/// until node1's agent reported it captured.
async fn enrolment(cluster: &mut Cluster) -> Vec<Duration> {
    let names: Vec<String> = (0..BURST).map(|i| format!("burst-{i}")).collect();
    for name in &names {
        cluster.add_pod_namespace("node1", "shop", name).unwrap();
    }
    cluster.write_config().unwrap();
    let listed = Instant::now();
    let agent = cluster.agent("node1").unwrap();
    let mut captured: Vec<Option<Duration>> = vec![None; BURST];
    while captured.iter().any(Option::is_none) {
        assert!(
            listed.elapsed() < Duration::from_secs(60),
            "the pods were never all captured"
        );
        let (_, body) = agent.get(15000, "/debug/workloads").await.unwrap().unwrap();
        let workloads: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        for workload in workloads.iter().filter(|w| w["capture"] == "captured") {
            let index = names.iter().position(|n| workload["name"] == n.as_str());
            if let Some(slot) = index.and_then(|i| captured.get_mut(i)) {
                slot.get_or_insert(listed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut times: Vec<Duration> = captured.into_iter().flatten().collect();
    times.sort();
    times
}

async fn throughput(path: &Path) -> f64 {
    let mut tcp = path.client.connect(path.sink).await.unwrap();
    measure::bulk_send(&mut tcp, BULK_BYTES).await
}

/// A connection to the echo app, past its greeting line.
async fn echo_stream(path: &Path) -> TcpStream {
    let mut tcp = path.client.connect(path.echo).await.unwrap();
    read_peer_line(&mut tcp).await.unwrap();
    tcp
}

/// Opens `HELD_CONNECTIONS` tunneled connections, one round trip each, and reports how much each
/// agent's resident memory grew per connection.
async fn held_connection_memory(cluster: &Cluster, mesh: &Path) -> Vec<(&'static str, f64)> {
    let nodes = ["node1", "node2"];
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| cluster.agent(n).unwrap().pid())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One tunnel first, so that the pooled connection and its buffers are not counted.
    let _warm = echo_stream(mesh).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<u64> = pids.iter().map(|pid| resident_kib(*pid)).collect();
    let mut held = Vec::with_capacity(HELD_CONNECTIONS);
    for _ in 0..HELD_CONNECTIONS {
        let mut tcp = echo_stream(mesh).await;
        measure::round_trips(&mut tcp, 0, 1).await;
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Vec<u64> = pids.iter().map(|pid| resident_kib(*pid)).collect();
    drop(held);
    nodes
        .into_iter()
        .zip(before.iter().zip(&after))
        .map(|(node, (before, after))| {
            (
                node,
                after.saturating_sub(*before) as f64 / HELD_CONNECTIONS as f64,
            )
        })
        .collect()
}

fn resident_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
}

/// The agent's footprint once what it freed is returned to the kernel (a second after, with
/// the agent's allocator options).
async fn footprint(pid: u32) -> Footprint {
    tokio::time::sleep(Duration::from_secs(2)).await;
    Footprint {
        resident_kib: resident_kib(pid),
        threads: status_field(pid, "Threads"),
    }
}

/// A number of `/proc/<pid>/status`, without its unit.
fn status_field(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    measure::status_field(&status, name).unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
}

/// Several thousand sockets are open at once: the bench's, and the agents' (who inherit it).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}
