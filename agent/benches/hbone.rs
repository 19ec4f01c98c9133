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

use ambit_agent::authorize::AllowAll;
use ambit_agent::drain;
use ambit_agent::sockets::LocalSockets;
use ambit_agent::telemetry::Meter;
use ambit_agent::{
    ClientSettings, ConnectRequest, HboneClient, HboneServer, Keepalive, TraceParent,
};
use ambit_test_support::measure::{self, Comparison};
use ambit_test_support::{EchoServer, TestPki};
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BULK_BYTES: u64 = 1 << 30;
const BULK_RUNS: usize = 3;
const ROUND_TRIPS: usize = 20_000;
const WARMUP_ROUND_TRIPS: usize = 1_000;
const NEW_CONNECTIONS: usize = 2_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let echo = EchoServer::start().await;
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    tokio::spawn(measure::serve_sink(sink));
    let pki = TestPki::new("cluster.local");
    let (_drain, tunnel_to_echo) = start_tunnel(&pki, echo.addr()).await;
    let (_drain_sink, tunnel_to_sink) = start_tunnel(&pki, sink_addr).await;

    let mut table = Comparison::new("direct", &["hbone"]);
    table.row(
        "bulk throughput (MiB/s)",
        throughput(sink_addr).await,
        &[throughput(tunnel_to_sink).await],
    );
    let direct = round_trips(echo.addr()).await;
    let tunnel = round_trips(tunnel_to_echo).await;
    for (metric, quantile) in [
        ("1 KiB round trip p50 (us)", 0.5),
        ("1 KiB round trip p99 (us)", 0.99),
    ] {
        table.row(
            metric,
            measure::percentile_us(&direct, quantile),
            &[measure::percentile_us(&tunnel, quantile)],
        );
    }
    table.row(
        "new connections/s (1 KiB round trip each)",
        connection_rate(echo.addr()).await,
        &[connection_rate(tunnel_to_echo).await],
    );
    println!("HBONE over loopback vs direct TCP (one run; ratio = hbone / direct)");
    print!("{}", table.render());
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
        Arc::new(AllowAll),
        Arc::default(),
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
                service: None,
                expected_identities: vec![server_identity.clone()],
                baggage: None,
                trace: TraceParent::random(),
            };
            let client = client.clone();
            tokio::spawn(async move {
                let tunnel = client
                    .connect(&request, &LocalSockets, &mut Bytes::new())
                    .await
                    .unwrap();
                let _ = tunnel.copy_bidirectional(&mut tcp, &Meter::default()).await;
            });
        }
    });
    (trigger, forwarder_addr)
}

/// The median of a few bulk transfers to the sink at `addr`.
async fn throughput(addr: SocketAddr) -> f64 {
    let mut rates = Vec::with_capacity(BULK_RUNS);
    for _ in 0..BULK_RUNS {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        rates.push(measure::bulk_send(&mut tcp, BULK_BYTES).await);
    }
    measure::median(rates)
}

async fn round_trips(addr: SocketAddr) -> Vec<std::time::Duration> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    measure::round_trips(&mut tcp, WARMUP_ROUND_TRIPS, ROUND_TRIPS).await
}

async fn connection_rate(addr: SocketAddr) -> f64 {
    measure::connection_rate(NEW_CONNECTIONS, || async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp
    })
    .await
}
