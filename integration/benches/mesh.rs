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
use std::time::{Duration, Instant};

use ambit_agent::lab::{Cluster, InPod, read_peer_line};
use ambit_integration::agent_binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 8080;
const BULK_BYTES: u64 = 512 << 20;
const BULK_RUNS: usize = 3;
const ROUND_TRIPS: usize = 10_000;
const WARMUP: usize = 500;
const NEW_CONNECTIONS: usize = 1_000;
const HELD_CONNECTIONS: usize = 1_000;
const MESSAGE: usize = 1024;

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
        start_sink(&pod).await;
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

    println!(
        "Pod to pod across two nodes, direct vs through the mesh (one run; ratio = mesh / direct)"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "metric", "direct", "mesh", "ratio"
    );
    let rows = [
        (
            "single-stream throughput (MiB/s)",
            throughput.0,
            throughput.1,
        ),
        (
            "1 KiB round trip p50 (us)",
            percentile(&direct_rtt, 0.5),
            percentile(&mesh_rtt, 0.5),
        ),
        (
            "1 KiB round trip p99 (us)",
            percentile(&direct_rtt, 0.99),
            percentile(&mesh_rtt, 0.99),
        ),
        ("new connections/s (1 KiB round trip each)", rate.0, rate.1),
    ];
    for (metric, direct, mesh) in rows {
        println!(
            "{metric:<44} {direct:>12.1} {mesh:>12.1} {:>8.2}",
            mesh / direct
        );
    }
    for (node, kib) in memory {
        println!(
            "agent {node}: {kib:.2} KiB resident per held tunneled connection ({HELD_CONNECTIONS} held)"
        );
    }
}

/// A server that reads until EOF, then answers with the byte count.
async fn start_sink(pod: &InPod) {
    let listener = pod.listen(SINK_PORT).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
            });
        }
    });
}

async fn throughput(path: &Path) -> f64 {
    let chunk = vec![0x5a; 256 * 1024];
    let mut rates = Vec::new();
    for _ in 0..BULK_RUNS {
        let mut tcp = path.client.connect(path.sink).await.unwrap();
        let start = Instant::now();
        let mut sent = 0;
        while sent < BULK_BYTES {
            tcp.write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
        }
        tcp.shutdown().await.unwrap();
        let mut count = [0; 8];
        tcp.read_exact(&mut count).await.unwrap();
        assert_eq!(u64::from_be_bytes(count), sent);
        rates.push(sent as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

async fn round_trips(path: &Path) -> Vec<Duration> {
    let mut tcp = path.client.connect(path.echo).await.unwrap();
    read_peer_line(&mut tcp).await.unwrap();
    let request = [0x42; MESSAGE];
    let mut response = [0; MESSAGE];
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..WARMUP + ROUND_TRIPS {
        let start = Instant::now();
        tcp.write_all(&request).await.unwrap();
        tcp.read_exact(&mut response).await.unwrap();
        if i >= WARMUP {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], quantile: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * quantile).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

async fn connection_rate(path: &Path) -> f64 {
    let request = [0x42; MESSAGE];
    let mut response = [0; MESSAGE];
    let start = Instant::now();
    for _ in 0..NEW_CONNECTIONS {
        let mut tcp = path.client.connect(path.echo).await.unwrap();
        read_peer_line(&mut tcp).await.unwrap();
        tcp.write_all(&request).await.unwrap();
        tcp.read_exact(&mut response).await.unwrap();
    }
    NEW_CONNECTIONS as f64 / start.elapsed().as_secs_f64()
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
    let mut warm = mesh.client.connect(mesh.echo).await.unwrap();
    read_peer_line(&mut warm).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<u64> = pids.iter().map(|pid| resident_kib(*pid)).collect();
    let mut held = Vec::with_capacity(HELD_CONNECTIONS);
    for _ in 0..HELD_CONNECTIONS {
        let mut tcp = mesh.client.connect(mesh.echo).await.unwrap();
        read_peer_line(&mut tcp).await.unwrap();
        tcp.write_all(&[1; MESSAGE]).await.unwrap();
        let mut response = [0; MESSAGE];
        tcp.read_exact(&mut response).await.unwrap();
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
