//! Services end to end on the namespace mesh: connections to a VIP spread over its ready
//! endpoints by load, an endpoint that stops answering is ejected, and a Service without ready
//! endpoints refuses at once, saying why.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_agent::admin::views::ServiceView;
use ambit_agent::lab::{Cluster, read_peer_line};
use ambit_integration::{ServiceYaml, logged, two_teams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const BACKENDS: [&str; 3] = ["server", "server2", "server3"];

/// The Service `name` at `vip`, port 80 to `APP_PORT` on `backends`, as YAML.
fn service(cluster: &Cluster, name: &str, vip: &str, backends: &[&str]) -> String {
    let backends: Vec<IpAddr> = backends
        .iter()
        .map(|pod| cluster.addr(pod, APP_PORT).unwrap().ip())
        .collect();
    ServiceYaml {
        name,
        namespace: "shop",
        vip,
        port_name: "http",
        target: APP_PORT,
        backends: &backends,
        labels: "",
    }
    .to_string()
}

/// Connects from the client to `vip:80` and waits for the app's greeting; `None` when the
/// connection is closed first.
async fn open(cluster: &Cluster, vip: &str) -> Option<TcpStream> {
    let addr: SocketAddr = format!("{vip}:80").parse().unwrap();
    let attempt = async {
        let mut stream = cluster.in_pod("client").unwrap().connect(addr).await?;
        read_peer_line(&mut stream).await?;
        Ok::<_, std::io::Error>(stream)
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .ok()?
        .ok()
}

/// One round trip to `vip:80`, then a clean close; false when refused.
async fn exchange(cluster: &Cluster, vip: &str) -> bool {
    let Some(mut stream) = open(cluster, vip).await else {
        return false;
    };
    let round_trip = async {
        stream.write_all(b"ping").await?;
        let mut echoed = [0; 4];
        stream.read_exact(&mut echoed).await?;
        stream.shutdown().await
    };
    round_trip.await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_traffic_spreads_by_load_and_skips_an_endpoint_that_stops_answering() {
    let mut cluster = two_teams()
        .pod("node2", "shop", "server2")
        .pod("node1", "shop", "server3")
        .start()
        .await
        .unwrap();
    let objects = [
        service(&cluster, "server", "10.96.0.10", &BACKENDS),
        service(&cluster, "empty", "10.96.0.11", &[]),
    ];
    cluster.set_extra_objects(&objects.concat());
    cluster.apply().await.unwrap();
    let mut apps = Vec::new();
    for backend in BACKENDS {
        apps.push(
            cluster
                .in_pod(backend)
                .unwrap()
                .echo(APP_PORT)
                .await
                .unwrap(),
        );
    }

    // Held open at once, connections go where fewer are open: a third each, give or take
    // three (with two random picks compared, a wider gap takes long unlucky streaks).
    let mut held = Vec::new();
    for _ in 0..60 {
        let stream = open(&cluster, "10.96.0.10").await;
        held.push(stream.unwrap_or_else(|| panic!("{}", cluster.logs())));
    }
    let accepted: Vec<usize> = apps.iter().map(|app| app.accepted()).collect();
    assert!(
        accepted.iter().all(|n| (17..=23).contains(n)),
        "{accepted:?}"
    );
    drop(held);

    // server3 stops answering: at most the one connection sent there fails, then it is
    // ejected and the others take everything.
    drop(apps.pop());
    // The app's listener closes with its task, a moment later: until then the kernel still
    // completes handshakes for it, which then fail otherwise than an endpoint that is gone.
    let in_server3 = cluster.in_pod("server3").unwrap();
    let local_app = SocketAddr::from(([127, 0, 0, 1], APP_PORT));
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_server3.connect(local_app).await.is_ok() {
        assert!(Instant::now() < deadline, "server3's app still listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let carried = || apps.iter().map(|app| app.accepted()).sum::<usize>();
    let before = carried();
    let mut failed = 0;
    for _ in 0..30 {
        if !exchange(&cluster, "10.96.0.10").await {
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "{}", cluster.logs());
    let node1 = cluster.agent("node1").unwrap();
    let server3 = cluster.addr("server3", APP_PORT).unwrap();
    let ejection = format!("endpoint {server3} ejected for 30s");
    logged(|| node1.log(), &ejection).await;
    let log = node1.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"connection closed\"") && l.contains(&ejection)),
        "the access log says why:\n{log}"
    );
    let output = node1.debug(&["services", "-o", "json"]).unwrap();
    let services: Vec<ServiceView> = serde_json::from_slice(&output.stdout).unwrap();
    let server = services.iter().find(|s| s.name == "server").unwrap();
    let ejected: Vec<_> = server
        .endpoints
        .iter()
        .filter(|e| e.ejected_for_s.is_some())
        .map(|e| e.ip)
        .collect();
    assert_eq!(ejected, [server3.ip()]);
    let table = node1.debug(&["services"]).unwrap();
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("3/3 ready, 1 ejected"),
        "{table:?}"
    );
    assert_eq!(carried() - before, 29, "the others carried the rest");

    // No ready endpoint: refused at once, with the reason in the access log.
    assert!(open(&cluster, "10.96.0.11").await.is_none());
    let node1 = cluster.agent("node1").unwrap();
    let refused = "service empty.shop.svc.cluster.local has no ready endpoint for port 80";
    logged(|| node1.log(), refused).await;
}
