//! Pod-to-pod TCP across two nodes of a namespace mesh: directly, between two pods outside the
//! mesh, and through the mesh (capture, HBONE between the agents, capture), on the same path in
//! one run. Needs root and a release build of the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench mesh`

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::SocketAddr;
use std::time::Duration;

use ambit_agent::lab::{Cluster, InPod, read_peer_line};
use ambit_integration::agent_binary;
use ambit_test_support::measure::{self, Comparison};
use tokio::net::TcpStream;

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 8080;
const BULK_BYTES: u64 = 512 << 20;
const BULK_RUNS: usize = 3;
const ROUND_TRIPS: usize = 10_000;
const WARMUP: usize = 500;
const NEW_CONNECTIONS: usize = 1_000;
const HELD_CONNECTIONS: usize = 1_000;

fn main() {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

struct Path {
    client: InPod,
    sink: SocketAddr,
    echo: SocketAddr,
}

async fn run() {
    let binary = agent_binary();
    assert!(
        binary.exists(),
        "build the agent first: cargo build --release -p ambit-agent"
    );
    let cluster = Cluster::builder(&binary)
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("plain")
        .pod("node1", "shop", "client")
        .pod("node2", "shop", "server")
        .pod("node1", "plain", "direct-client")
        .pod("node2", "plain", "direct-server")
        .start()
        .await
        .unwrap();
    let mut apps = Vec::new();
    for server in ["server", "direct-server"] {
        let pod = cluster.in_pod(server).unwrap();
        apps.push(pod.echo(ECHO_PORT).await.unwrap());
        tokio::spawn(measure::serve_sink(pod.listen(SINK_PORT).await.unwrap()));
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
    let throughput = (throughput(&direct).await, throughput(&mesh).await);
    let direct_rtt = round_trips(&direct).await;
    let mesh_rtt = round_trips(&mesh).await;
    let rate = (connection_rate(&direct).await, connection_rate(&mesh).await);

    let mut table = Comparison::new("direct", "mesh");
    table.row(
        "single-stream throughput (MiB/s)",
        throughput.0,
        throughput.1,
    );
    table.row(
        "1 KiB round trip p50 (us)",
        measure::percentile_us(&direct_rtt, 0.5),
        measure::percentile_us(&mesh_rtt, 0.5),
    );
    table.row(
        "1 KiB round trip p99 (us)",
        measure::percentile_us(&direct_rtt, 0.99),
        measure::percentile_us(&mesh_rtt, 0.99),
    );
    table.row("new connections/s (1 KiB round trip each)", rate.0, rate.1);
    println!(
        "Pod to pod across two nodes, direct vs through the mesh (one run; ratio = mesh / direct)"
    );
    print!("{}", table.render());
    for (node, kib) in memory {
        println!(
            "agent {node}: {kib:.2} KiB resident per held tunneled connection ({HELD_CONNECTIONS} held)"
        );
    }
}

async fn throughput(path: &Path) -> f64 {
    let mut rates = Vec::with_capacity(BULK_RUNS);
    for _ in 0..BULK_RUNS {
        let mut tcp = path.client.connect(path.sink).await.unwrap();
        rates.push(measure::bulk_send(&mut tcp, BULK_BYTES).await);
    }
    measure::median(rates)
}

/// A connection to the echo app, past its greeting line.
async fn echo_stream(path: &Path) -> TcpStream {
    let mut tcp = path.client.connect(path.echo).await.unwrap();
    read_peer_line(&mut tcp).await.unwrap();
    tcp
}

async fn round_trips(path: &Path) -> Vec<Duration> {
    let mut tcp = echo_stream(path).await;
    measure::round_trips(&mut tcp, WARMUP, ROUND_TRIPS).await
}

async fn connection_rate(path: &Path) -> f64 {
    measure::connection_rate(NEW_CONNECTIONS, || echo_stream(path)).await
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Several thousand sockets are open at once: the bench's, and the agents' (who inherit it).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}
