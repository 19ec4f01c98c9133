//! The agent's resident memory per pod of the cluster with `--source kubernetes`: the agent
//! keeps every pod in a reflector store, trimmed to what the model reads, and a cluster state
//! built from the stores.
//!
//! For each pod count, the bench writes the objects the fake API server serves: namespaces,
//! some in the ambient mesh, and pods as a real API server serves them (containers with env,
//! ports, resources and probes, the service account token volume, conditions, container
//! statuses, managed fields, a ReplicaSet owner), all on other nodes than the agent's, so that
//! none is enrolled. The server and the agent run in a network namespace of their own; once the
//! agent is ready (it has listed every kind) and has settled, its `VmRSS` and `RssAnon` are
//! read a few times and averaged. The baseline is the agent of an empty cluster, measured in the
//! same run; the growth per pod is set against the JSON the API server serves per pod.
//!
//! Two more cases tell where the growth goes: the same pods with the agent's allocator
//! returning freed pages at once (what the agent holds, without what the allocator keeps of the
//! initial lists), and pods cut down beforehand to the fields the agent keeps (what the full
//! objects cost on their way through). Needs root and a release build of the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench source`
//!
//! The bench runs the `ambit` next to it; `AMBIT_BIN=/abs/path/target/release/ambit` names
//! another one (a shared target directory, a build of another checkout).

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_agent::READY_PATH;
use ambit_agent::lab::topology::Topology;
use ambit_agent::lab::{ISTIO_CRDS, InPod};
use ambit_integration::agent_binary;
use ambit_test_support::measure;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pod counts measured, besides an empty cluster for the baseline.
const POD_COUNTS: [usize; 2] = [2_000, 10_000];
/// Namespaces the pods are spread over; every other one is in the ambient mesh.
const NAMESPACES: usize = 40;
/// Nodes the pods are spread over, none of them the agent's.
const NODES: usize = 100;
/// Pods per ReplicaSet.
const REPLICAS: usize = 10;
const AGENT_NODE: &str = "bench-node";
const READINESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
/// How long the agent gets after turning ready before it is measured: its allocator (jemalloc)
/// hands pages freed after the initial lists back to the kernel over about ten seconds, and
/// only as the agent allocates again.
const SETTLE: Duration = Duration::from_secs(30);
/// For the agent's jemalloc: freed pages go back to the kernel at once.
const RETURN_AT_ONCE: &str = "dirty_decay_ms:0,muzzy_decay_ms:0";
const READINGS: usize = 5;
const READING_INTERVAL: Duration = Duration::from_millis(200);
/// Long enough for the largest cluster on a slow machine; only there so that a hang ends.
const PATIENCE: Duration = Duration::from_secs(300);

/// How the pods are written in the objects file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// As an API server serves them.
    Served,
    /// Cut down beforehand to the fields the agent keeps.
    Kept,
}

/// One group of rows: how the pods are written, and how the agent's allocator runs.
#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    shape: Shape,
    /// The agent's `_RJEM_MALLOC_CONF`, if any.
    allocator: Option<&'static str>,
}

const CASES: [Case; 3] = [
    Case {
        label: "as served",
        shape: Shape::Served,
        allocator: None,
    },
    Case {
        label: "as served, no decay",
        shape: Shape::Served,
        allocator: Some(RETURN_AT_ONCE),
    },
    Case {
        label: "kept fields only",
        shape: Shape::Kept,
        allocator: None,
    },
];

/// What one agent measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    pods: usize,
    /// Bytes of the objects file.
    file_bytes: u64,
    /// Bytes of the pods' JSON, as the API server serves them.
    pod_json_bytes: u64,
    ready: Duration,
    /// One reading as the agent turns ready, just after its initial lists.
    at_ready: Memory,
    /// The mean of the readings once settled.
    settled: Memory,
}

/// Resident memory, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: f64,
    anon: f64,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let binary = agent_binary();
    assert!(
        binary.exists(),
        "build the agent first (cargo build --release -p ambit-agent) and name it with AMBIT_BIN; \
         no agent at {}",
        binary.display()
    );
    let measure = async |pods, case: &Case| {
        measure(&binary, pods, case)
            .await
            .unwrap_or_else(|e| panic!("{pods} pods, {}: {e:?}", case.label))
    };
    // An empty cluster is the same whatever the shape of its pods.
    let mut baselines: Vec<(Option<&str>, Measured)> = Vec::new();
    let mut groups = Vec::new();
    for case in &CASES {
        let baseline = match baselines.iter().find(|(a, _)| *a == case.allocator) {
            Some((_, baseline)) => *baseline,
            None => {
                let baseline = measure(0, case).await;
                baselines.push((case.allocator, baseline));
                baseline
            }
        };
        let mut runs = vec![baseline];
        for pods in POD_COUNTS {
            runs.push(measure(pods, case).await);
        }
        groups.push((case, runs));
    }
    print_table(&groups);
}

fn print_table(groups: &[(&Case, Vec<Measured>)]) {
    println!(
        "Agent resident memory with --source kubernetes, by pods in the cluster (none on the \
         agent's node; {NAMESPACES} namespaces, half ambient), {} s after ready, mean of \
         {READINGS} readings",
        SETTLE.as_secs()
    );
    println!(
        "  {:<20} {:>6} {:>8} {:>8} {:>7} {:>9} {:>8} {:>8} {:>10} {:>10} {:>6}",
        "pods",
        "count",
        "file MiB",
        "JSON/pod",
        "ready s",
        "anon@rdy",
        "RSS MiB",
        "anon MiB",
        "+RSS/pod",
        "+anon/pod",
        "ratio",
    );
    let mib = |kib: f64| kib / 1024.0;
    for (case, runs) in groups {
        let Some(baseline) = runs.first() else {
            continue;
        };
        for run in runs {
            let per_pod = |value: f64, base: f64| match run.pods {
                0 => None,
                pods => Some((value - base) * 1024.0 / pods as f64),
            };
            let rss = per_pod(run.settled.rss, baseline.settled.rss);
            let anon = per_pod(run.settled.anon, baseline.settled.anon);
            let json = (run.pods > 0).then(|| run.pod_json_bytes as f64 / run.pods as f64);
            let ratio = anon.zip(json).map(|(anon, json)| anon / json);
            println!(
                "  {:<20} {:>6} {:>8.1} {:>8} {:>7.2} {:>9.1} {:>8.1} {:>8.1} {:>10} {:>10} {:>6}",
                case.label,
                run.pods,
                run.file_bytes as f64 / f64::from(1 << 20),
                optional(json, 0),
                run.ready.as_secs_f64(),
                mib(run.at_ready.anon),
                mib(run.settled.rss),
                mib(run.settled.anon),
                optional(rss, 0),
                optional(anon, 0),
                optional(ratio, 2),
            );
        }
    }
    println!(
        "  JSON/pod: bytes the API server serves per pod; anon@rdy: RssAnon as the agent turns \
         ready; RSS, anon: VmRSS and RssAnon settled; +RSS/pod, +anon/pod: bytes per pod over \
         the empty cluster; ratio: +anon/pod over JSON/pod; no decay: the agent's jemalloc \
         returns freed pages at once ({RETURN_AT_ONCE}); ready s: mostly the fake API server's \
         paging of large lists"
    );
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Starts the fake API server with `pods` pods of the case's shape and an agent against it, in
/// a namespace of their own, and measures the agent once it is ready and settled.
async fn measure(binary: &Path, pods: usize, case: &Case) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let objects = dir.path().join("objects.yaml");
    let pod_json_bytes = write_objects(&objects, pods, case.shape)?;
    let file_bytes = std::fs::metadata(&objects)?.len();
    let mut topology = Topology::new().context("a network namespace")?;
    let netns = topology.add_node(AGENT_NODE)?.netns;

    let (_server, kubeconfig) = start_server(&netns, &objects, dir.path()).await?;

    let mut command = Topology::command_in(&netns, binary);
    command
        .args(["agent", "--node", AGENT_NODE, "--source", "kubernetes"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .args(["--redirect", "nftables"])
        .args(["--readiness-addr", &READINESS.to_string()])
        .args(["--metrics-addr", "127.0.0.1:15020"])
        .args(["--admin-addr", "127.0.0.1:15000"])
        .env("AMBIT_LOG", "info");
    if let Some(allocator) = case.allocator {
        command.env("_RJEM_MALLOC_CONF", allocator);
    }
    let started = Instant::now();
    let mut agent = Process::start("the agent", &mut command, dir.path().join("agent.log"))?;
    let node = InPod::open(&Path::new("/var/run/netns").join(&netns))?;
    while !ready(&node).await {
        agent.check(started)?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    let at_ready = resident(agent.id(), 1).await?;
    tokio::time::sleep(SETTLE).await;
    let settled = resident(agent.id(), READINGS).await?;
    agent.check(started)?;
    Ok(Measured {
        pods,
        file_bytes,
        pod_json_bytes,
        ready,
        at_ready,
        settled,
    })
}

/// Starts the fake API server in `netns`, serving `objects`; returns it and its kubeconfig once
/// it listens.
async fn start_server(
    netns: &str,
    objects: &Path,
    dir: &Path,
) -> anyhow::Result<(Process, PathBuf)> {
    let kubeconfig = dir.join("kubeconfig");
    let mut server = Process::start(
        "the API server",
        Topology::command_in(netns, env!("CARGO_BIN_EXE_fake-apiserver"))
            .arg("--objects")
            .arg(objects)
            .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(&kubeconfig)
            // The file never changes: spare the agent's CPU the server's rereading of it.
            .args(["--poll-interval-ms", "3600000"]),
        dir.join("apiserver.log"),
    )?;
    server
        .wait_for(|| kubeconfig.exists(), "the API server's kubeconfig")
        .await?;
    Ok((server, kubeconfig))
}

/// Whether the agent in `node` answers its readiness probe with 200.
async fn ready(node: &InPod) -> bool {
    let probe = async {
        let mut stream = node.connect(READINESS).await?;
        let request = format!("GET {READY_PATH} HTTP/1.0\r\nHost: {READINESS}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(
            response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"),
        )
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .is_ok_and(|answer| answer.unwrap_or(false))
}

/// The mean of `readings` readings of the process's resident memory.
async fn resident(pid: u32, readings: usize) -> anyhow::Result<Memory> {
    let mut sum = Memory::default();
    for _ in 0..readings {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading the status of process {pid}"))?;
        let field = |name: &str| {
            measure::status_field(&status, name)
                .map(|kib| kib as f64)
                .with_context(|| format!("{name} in /proc/{pid}/status"))
        };
        sum.rss += field("VmRSS")?;
        sum.anon += field("RssAnon")?;
        tokio::time::sleep(READING_INTERVAL).await;
    }
    let readings = readings as f64;
    Ok(Memory {
        rss: sum.rss / readings,
        anon: sum.anon / readings,
    })
}

/// A child process logging to a file; killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Self { name, child, log })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited or `since` is longer ago than [`PATIENCE`].
    fn check(&mut self, since: Instant) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}:\n{}", self.name, self.log());
        }
        if since.elapsed() > PATIENCE {
            bail!(
                "{} did not answer in {PATIENCE:?}:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }

    async fn wait_for(&mut self, condition: impl Fn() -> bool, what: &str) -> anyhow::Result<()> {
        let since = Instant::now();
        while !condition() {
            self.check(since)
                .with_context(|| format!("waiting for {what}"))?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the namespaces, Istio's CRDs and `pods` pods of `shape` as one JSON document each;
/// returns the bytes of the pods' JSON.
fn write_objects(path: &Path, pods: usize, shape: Shape) -> anyhow::Result<u64> {
    let mut file =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    file.write_all(ISTIO_CRDS.as_bytes())?;
    for index in 0..NAMESPACES {
        writeln!(file, "---\n{}", namespace(index))?;
    }
    let mut pod_json_bytes = 0;
    for index in 0..pods {
        let served = pod(index);
        let pod = match shape {
            Shape::Served => served,
            Shape::Kept => kept(&served),
        };
        let json = serde_json::to_string(&pod)?;
        pod_json_bytes += json.len() as u64;
        writeln!(file, "---\n{json}")?;
    }
    file.flush()?;
    Ok(pod_json_bytes)
}

fn namespace(index: usize) -> Value {
    let name = namespace_name(index);
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if index.is_multiple_of(2) {
        labels["istio.io/dataplane-mode"] = json!("ambient");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": uuid(1 << 32 | index as u64),
            "creationTimestamp": "2024-05-02T09:12:44Z",
            "labels": labels,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn namespace_name(index: usize) -> String {
    format!("team-{index}")
}

/// Where a container finds its service account token.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Pod `index`: one of the `REPLICAS` pods of a Deployment's ReplicaSet, on some other node.
fn pod(index: usize) -> Value {
    let deployment = index / REPLICAS;
    let app = format!("service-{deployment}");
    let namespace = namespace_name(deployment % NAMESPACES);
    let hash = name_suffix(deployment as u64, 10);
    let replica_set = format!("{app}-{hash}");
    let name = format!("{replica_set}-{}", name_suffix(1 << 40 | index as u64, 5));
    let node = format!("node-{}", index % NODES);
    let ip = format!(
        "10.{}.{}.{}",
        64 + index / 65_536,
        index / 256 % 256,
        index % 256
    );
    let host_ip = format!("192.168.{}.{}", index % NODES / 256, index % NODES + 10);
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": pod_metadata(&name, &namespace, &app, &hash, &replica_set, index, deployment),
        "spec": pod_spec(&app, &node, index),
        "status": pod_status(&ip, &host_ip, &app, index),
    });
    pod["metadata"]["managedFields"] = managed_fields(&pod);
    pod
}

fn pod_metadata(
    name: &str,
    namespace: &str,
    app: &str,
    hash: &str,
    replica_set: &str,
    index: usize,
    deployment: usize,
) -> Value {
    json!({
        "name": name,
        "generateName": format!("{replica_set}-"),
        "namespace": namespace,
        "uid": uuid(index as u64),
        "creationTimestamp": "2024-11-18T14:03:27Z",
        "labels": {
            "app": app,
            "app.kubernetes.io/name": app,
            "app.kubernetes.io/part-of": "storefront",
            "version": "v3",
            "pod-template-hash": hash,
        },
        "annotations": {
            "kubectl.kubernetes.io/restartedAt": "2024-11-18T14:03:20Z",
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9090",
            "prometheus.io/path": "/metrics",
        },
        "ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": replica_set,
            "uid": uuid(1 << 33 | deployment as u64),
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    })
}

/// What kube-controller-manager (the metadata and spec from the ReplicaSet's template) and the
/// kubelet (the status) wrote, as `managedFields` records it.
fn managed_fields(pod: &Value) -> Value {
    let mut metadata = pod["metadata"].clone();
    if let Some(fields) = metadata.as_object_mut() {
        fields.retain(|name, _| {
            ["generateName", "labels", "annotations", "ownerReferences"].contains(&name.as_str())
        });
    }
    let entry = |manager: &str, time: &str, fields: Value| {
        json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": "v1",
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        })
    };
    let mut kubelet = entry(
        "kubelet",
        "2024-11-18T14:03:41Z",
        json!({"f:status": field_set(&pod["status"])}),
    );
    kubelet["subresource"] = json!("status");
    json!([
        entry(
            "kube-controller-manager",
            "2024-11-18T14:03:27Z",
            json!({"f:metadata": field_set(&metadata), "f:spec": field_set(&pod["spec"])}),
        ),
        kubelet,
    ])
}

/// The `fieldsV1` set of `value`: `f:<name>` for each field, `k:<key>` for each item of a list
/// whose items have a key, as the API server records who owns which field.
fn field_set(value: &Value) -> Value {
    let mut set = serde_json::Map::new();
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                set.insert(format!("f:{name}"), field_set(field));
            }
        }
        Value::Array(items) => {
            for item in items {
                let key = ["name", "type", "ip", "containerPort", "mountPath"]
                    .into_iter()
                    .find_map(|key| Some(json!({key: item.get(key)?})));
                if let Some(key) = key {
                    set.insert(format!("k:{key}"), field_set(item));
                }
            }
        }
        _ => return json!({}),
    }
    if !set.is_empty() {
        set.insert(".".to_owned(), json!({}));
    }
    Value::Object(set)
}

fn pod_spec(app: &str, node: &str, index: usize) -> Value {
    let token_volume = format!("kube-api-access-{}", name_suffix(2 << 40 | index as u64, 5));
    json!({
        "volumes": [
            {"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
            {"name": token_volume, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt",
                               "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                                            "fieldRef": field_ref("metadata.namespace")}]}},
            ]}},
        ],
        "containers": [app_container(app, &token_volume), log_shipper(&token_volume)],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": app,
        "serviceAccount": app,
        "nodeName": node,
        "securityContext": {"runAsNonRoot": true, "fsGroup": 2000},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
        ],
        "priority": 0,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
    })
}

fn app_container(app: &str, token_volume: &str) -> Value {
    let field = |path: &str| json!({"fieldRef": field_ref(path)});
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": "http", "scheme": "HTTP"}, "timeoutSeconds": 1,
               "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3})
    };
    json!({
        "name": "app",
        "image": format!("registry.example.com/storefront/{app}:3.14.2"),
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
        ],
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "HTTP_PORT", "value": "8080"},
            {"name": "DATABASE_URL", "value": format!("postgres://{app}.storefront-db:5432/{app}")},
            {"name": "DATABASE_PASSWORD",
             "valueFrom": {"secretKeyRef": {"name": format!("{app}-db"), "key": "password"}}},
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_IP", "valueFrom": field("status.podIP")},
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT",
             "value": "http://otel-collector.observability:4317"},
        ],
        "resources": {"limits": {"memory": "512Mi"},
                      "requests": {"cpu": "250m", "memory": "256Mi"}},
        "volumeMounts": [
            {"name": "config", "readOnly": true, "mountPath": "/etc/app"},
            {"name": token_volume, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT},
        ],
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/ready"),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}},
    })
}

fn field_ref(path: &str) -> Value {
    json!({"apiVersion": "v1", "fieldPath": path})
}

fn log_shipper(token_volume: &str) -> Value {
    json!({
        "name": "log-shipper",
        "image": "docker.io/fluent/fluent-bit:3.1.9",
        "args": ["--config=/fluent-bit/etc/fluent-bit.yaml"],
        "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "32Mi"}},
        "volumeMounts": [
            {"name": token_volume, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT},
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    })
}

fn pod_status(ip: &str, host_ip: &str, app: &str, index: usize) -> Value {
    let condition = |kind: &str| {
        json!({"type": kind, "status": "True", "lastProbeTime": null,
               "lastTransitionTime": "2024-11-18T14:03:41Z"})
    };
    let container = |name: &str, image: &str, seed: u64| {
        json!({
            "name": name,
            "state": {"running": {"startedAt": "2024-11-18T14:03:35Z"}},
            "lastState": {},
            "ready": true,
            "restartCount": 0,
            "image": image,
            "imageID": format!("{image}@sha256:{}", hex(seed, 64)),
            "containerID": format!("containerd://{}", hex(seed ^ index as u64, 64)),
            "started": true,
        })
    };
    let conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(condition);
    json!({
        "phase": "Running",
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": "2024-11-18T14:03:27Z",
        "containerStatuses": [
            container("app", &format!("registry.example.com/storefront/{app}:3.14.2"), 1 << 34),
            container("log-shipper", "docker.io/fluent/fluent-bit:3.1.9", 1 << 35),
        ],
        "qosClass": "Burstable",
    })
}

/// The fields of a served pod that the agent keeps (see the source's trimming).
fn kept(pod: &Value) -> Value {
    let metadata = &pod["metadata"];
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "labels": metadata["labels"],
            "ownerReferences": metadata["ownerReferences"],
        },
        "spec": {
            "nodeName": pod["spec"]["nodeName"],
            "serviceAccountName": pod["spec"]["serviceAccountName"],
            "containers": [],
        },
        "status": {"podIP": pod["status"]["podIP"], "podIPs": pod["status"]["podIPs"]},
    })
}

/// `len` characters of the alphabet Kubernetes draws generated names from.
fn name_suffix(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut state = seed;
    (0..len)
        .map(|_| char::from(ALPHABET[(mix(&mut state) % ALPHABET.len() as u64) as usize]))
        .collect()
}

fn hex(seed: u64, len: usize) -> String {
    let mut state = seed;
    let mut text = String::with_capacity(len + 16);
    while text.len() < len {
        text.push_str(&format!("{:016x}", mix(&mut state)));
    }
    text.truncate(len);
    text
}

fn uuid(seed: u64) -> String {
    let hex = hex(seed, 32);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// splitmix64: distinct, stable pseudo-random names from a seed.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
