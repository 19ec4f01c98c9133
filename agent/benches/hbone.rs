//! HBONE over loopback against direct TCP on the same path, measured in one run.
//!
//! The tunnel path is what a captured connection takes, minus capture: the client's TCP
//! connection is accepted by a forwarder that opens an HBONE tunnel (mTLS, HTTP/2 CONNECT) to
//! the server, which connects to the app. Both paths use the same client and the same app.
//!
//! `cargo bench -p ambit-agent --bench hbone`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_agent::drain;
use ambit_agent::sockets::LocalSockets;
use ambit_agent::{ClientSettings, ConnectRequest, HboneClient, HboneServer, Keepalive};
use ambit_test_support::{EchoServer, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BULK_BYTES: u64 = 1 << 30;
const BULK_RUNS: usize = 3;
const ROUND_TRIPS: usize = 20_000;
const WARMUP_ROUND_TRIPS: usize = 1_000;
const NEW_CONNECTIONS: usize = 2_000;
const MESSAGE: usize = 1024;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let echo = EchoServer::start().await;
    let sink = start_sink().await;
    let pki = TestPki::new("cluster.local");
    let (_drain, tunnel_to_echo) = start_tunnel(&pki, echo.addr()).await;
    let (_drain_sink, tunnel_to_sink) = start_tunnel(&pki, sink).await;

    let throughput = (
        "bulk throughput (MiB/s)",
        bulk_throughput(sink).await,
        bulk_throughput(tunnel_to_sink).await,
    );
    let [p50, p99] = latency_rows(echo.addr(), tunnel_to_echo).await;
    let connections = (
        "new connections/s (1 KiB round trip each)",
        connection_rate(echo.addr()).await,
        connection_rate(tunnel_to_echo).await,
    );

    println!("HBONE over loopback vs direct TCP (one run; ratio = tunnel / direct)");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "metric", "direct", "hbone", "ratio"
    );
    for (metric, direct, tunnel) in [throughput, p50, p99, connections] {
        println!(
            "{metric:<44} {direct:>12.1} {tunnel:>12.1} {:>8.2}",
            tunnel / direct
        );
    }
}

/// Where a client connects to reach the app through an HBONE tunnel.
async fn start_tunnel(pki: &TestPki, app: SocketAddr) -> (drain::DrainTrigger, SocketAddr) {
    let certificates = pki.manager();
    let server_identity = pki.identity("bench", "server");
    let client_identity = pki.identity("bench", "client");
    let (trigger, watcher) = drain::channel();

    let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_addr = hbone.local_addr().unwrap();
    let server = HboneServer::new(
        server_identity.clone(),
        certificates.clone(),
        Keepalive::default(),
        Arc::new(LocalSockets),
    );
    tokio::spawn(server.serve(hbone, watcher));

    let client = HboneClient::new(certificates, ClientSettings::default());
    let forwarder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forwarder_addr = forwarder.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, peer) = forwarder.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let request = ConnectRequest {
                source: client_identity.clone(),
                source_addr: peer,
                hbone_addr,
                authority: app,
                expected_identities: vec![server_identity.clone()],
                baggage: None,
            };
            let client = client.clone();
            tokio::spawn(async move {
                let tunnel = client.connect(&request, &LocalSockets).await.unwrap();
                let _ = tunnel.copy_bidirectional(&mut tcp).await;
            });
        }
    });
    (trigger, forwarder_addr)
}

/// Reads until EOF, then answers with the byte count.
async fn start_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// The median of a few runs, each sending `BULK_BYTES` and waiting for the sink's count.
async fn bulk_throughput(addr: SocketAddr) -> f64 {
    let chunk = vec![0x5a; 256 * 1024];
    let mut rates = Vec::with_capacity(BULK_RUNS);
    for _ in 0..BULK_RUNS {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
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

/// p50 and p99 of 1 KiB request/response round trips over one connection, in microseconds.
async fn latency_rows(direct: SocketAddr, tunnel: SocketAddr) -> [(&'static str, f64, f64); 2] {
    let direct = round_trips(direct).await;
    let tunnel = round_trips(tunnel).await;
    [
        (
            "1 KiB round trip p50 (us)",
            percentile(&direct, 0.50),
            percentile(&tunnel, 0.50),
        ),
        (
            "1 KiB round trip p99 (us)",
            percentile(&direct, 0.99),
            percentile(&tunnel, 0.99),
        ),
    ]
}

async fn round_trips(addr: SocketAddr) -> Vec<Duration> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let request = [0x42; MESSAGE];
    let mut response = [0; MESSAGE];
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..WARMUP_ROUND_TRIPS + ROUND_TRIPS {
        let start = Instant::now();
        tcp.write_all(&request).await.unwrap();
        tcp.read_exact(&mut response).await.unwrap();
        if i >= WARMUP_ROUND_TRIPS {
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

/// Connections per second, each: connect, one 1 KiB round trip, close.
async fn connection_rate(addr: SocketAddr) -> f64 {
    let request = [0x42; MESSAGE];
    let mut response = [0; MESSAGE];
    let start = Instant::now();
    for _ in 0..NEW_CONNECTIONS {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(&request).await.unwrap();
        tcp.read_exact(&mut response).await.unwrap();
    }
    NEW_CONNECTIONS as f64 / start.elapsed().as_secs_f64()
}
