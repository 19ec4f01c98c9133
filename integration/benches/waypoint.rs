//! HTTP/1.1 requests across two nodes of a namespace mesh: through the mesh at L4 (capture,
//! HBONE between the agents) and through `ambit waypoint` (HBONE to the waypoint, which decides
//! each request by an HTTP policy, counts it and forwards it over HBONE), on the same nodes in
//! one run. Needs root and a release build of the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench waypoint`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_agent::lab::Cluster;
use ambit_integration::{ServiceYaml, agent_binary};
use ambit_test_support::measure::{self, Comparison};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const HTTP_APP_PORT: u16 = 8081;
const REQUESTS: usize = 5_000;
const WARMUP: usize = 500;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let binary = agent_binary();
    assert!(
        binary.exists(),
        "build the agent first: cargo build --release -p ambit-agent"
    );
    let mut cluster = Cluster::builder(&binary)
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .pod("node1", "shop", "client")
        .pod("node2", "shop", "server")
        .pod("node2", "shop", "server-l4")
        .waypoint("node2", "shop", "waypoint", "service")
        .start()
        .await
        .unwrap();
    let services = [
        service(&cluster, "web", "10.96.0.20", "server", true),
        service(&cluster, "web-l4", "10.96.0.21", "server-l4", false),
    ];
    cluster.set_extra_objects(&format!(
        "{}{}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reads, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  rules: [{{to: [{{operation: {{methods: [GET], paths: [/items*]}}}}]}}]
",
        services[0], services[1]
    ));
    cluster.apply().await.unwrap();
    let _apps = [
        cluster
            .in_pod("server")
            .unwrap()
            .http(HTTP_APP_PORT, false)
            .await
            .unwrap(),
        cluster
            .in_pod("server-l4")
            .unwrap()
            .http(HTTP_APP_PORT, false)
            .await
            .unwrap(),
    ];

    let l4 = requests(&cluster, "10.96.0.21:80".parse().unwrap()).await;
    let waypoint = requests(&cluster, "10.96.0.20:80".parse().unwrap()).await;
    let rate = |samples: &[Duration]| {
        samples.len() as f64 / samples.iter().sum::<Duration>().as_secs_f64()
    };
    let p50 = |samples: &[Duration]| measure::percentile_us(samples, 0.5);
    let p99 = |samples: &[Duration]| measure::percentile_us(samples, 0.99);
    let mut table = Comparison::new("L4 mesh", &["waypoint"]);
    table.row(
        "requests/s (one connection, one at a time)",
        rate(&l4),
        &[rate(&waypoint)],
    );
    table.row("request p50 (us)", p50(&l4), &[p50(&waypoint)]);
    table.row("request p99 (us)", p99(&l4), &[p99(&waypoint)]);
    println!(
        "HTTP/1.1 GET, pod to pod across two nodes: through the mesh at L4, and through the \
         waypoint (decided by an HTTP policy, counted, forwarded); ratio = waypoint / L4"
    );
    print!("{}", table.render());
}

/// The Service `name` at `vip`, port 80 (`http`) to the HTTP app of `pod`, through the
/// waypoint when `through_waypoint`.
fn service(cluster: &Cluster, name: &str, vip: &str, pod: &str, through_waypoint: bool) -> String {
    ServiceYaml {
        name,
        namespace: "shop",
        vip,
        port_name: "http",
        target: HTTP_APP_PORT,
        backends: &[cluster.addr(pod, HTTP_APP_PORT).unwrap().ip()],
        labels: if through_waypoint {
            "istio.io/use-waypoint: waypoint"
        } else {
            ""
        },
    }
    .to_string()
}

/// `REQUESTS` GETs, one at a time on one connection from the client to `addr`, after `WARMUP`
/// unmeasured ones; sorted.
async fn requests(cluster: &Cluster, addr: SocketAddr) -> Vec<Duration> {
    let stream = cluster
        .in_pod("client")
        .unwrap()
        .connect(addr)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut samples = Vec::with_capacity(REQUESTS);
    for i in 0..WARMUP + REQUESTS {
        let start = Instant::now();
        get(&mut sender, "/items/1").await;
        if i >= WARMUP {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    samples
}

async fn get(sender: &mut SendRequest<Empty<bytes::Bytes>>, path: &str) {
    let request = http::Request::get(path)
        .header(http::header::HOST, "web.shop.svc.cluster.local")
        .body(Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}
