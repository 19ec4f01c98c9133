//! Waypoints end to end on the namespace mesh: traffic to a Service bound to `ambit waypoint`
//! goes through it, a client that goes around it to the pod is refused, and the destination
//! applies its L4 policies to the waypoint's identity.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::net::SocketAddr;
use std::time::Duration;

use ambit_agent::admin::views::{CheckView, ServiceView};
use ambit_agent::lab::{Cluster, read_peer_line};
use ambit_integration::{ServiceYaml, assert_cut_off_is_reset, logged, serve_cut_off, two_teams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";

/// The Service `server` in front of the server pod, bound to the waypoint `shop/waypoint`,
/// with `policies`.
fn objects(cluster: &Cluster, policies: &str) -> String {
    let service = ServiceYaml {
        name: "server",
        namespace: "shop",
        vip: VIP,
        port_name: "tcp",
        target: APP_PORT,
        backends: &[cluster.addr("server", APP_PORT).unwrap().ip()],
        labels: "istio.io/use-waypoint: waypoint",
    };
    format!("{service}{policies}")
}

/// The two teams with the waypoint `shop/waypoint` on node1, and the Service `server` bound to
/// it, with no policy.
async fn bound_to_waypoint() -> Cluster {
    let mut cluster = two_teams()
        .waypoint("node1", "shop", "waypoint", "service")
        .start()
        .await
        .unwrap();
    cluster.set_extra_objects(&objects(&cluster, ""));
    cluster.apply().await.unwrap();
    cluster
}

/// Connects from `from` to `to`, and returns the client address the app saw, after one
/// round trip; `None` when refused.
async fn greeting(cluster: &Cluster, from: &str, to: SocketAddr) -> Option<String> {
    let attempt = async {
        let mut stream = cluster.in_pod(from).unwrap().connect(to).await?;
        let peer = read_peer_line(&mut stream).await?;
        stream.write_all(b"ping").await?;
        let mut echoed = [0; 4];
        stream.read_exact(&mut echoed).await?;
        Ok::<_, std::io::Error>(peer)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_traffic_goes_through_the_waypoint_and_nothing_goes_around_it() {
    let mut cluster = bound_to_waypoint().await;
    let _app = cluster
        .in_pod("server")
        .unwrap()
        .echo(APP_PORT)
        .await
        .unwrap();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let waypoint_ip = cluster.addr("waypoint", 0).unwrap().ip();
    let server = cluster.addr("server", APP_PORT).unwrap();

    // Through the waypoint: the app sees the waypoint as its client.
    let peer = greeting(&cluster, "client", vip).await;
    assert_eq!(
        peer.as_deref(),
        Some(waypoint_ip.to_string().as_str()),
        "{}\n{}",
        cluster.logs(),
        cluster.waypoint("waypoint").unwrap().log()
    );
    let waypoint = cluster.waypoint("waypoint").unwrap();
    let endpoint = format!("\"dst.endpoint\":\"{server}\"");
    logged(|| waypoint.log(), &endpoint).await;
    // One trace across the three hops: the waypoint continues the one the client's agent began.
    let log = waypoint.log();
    let line = log.lines().find(|l| l.contains(&endpoint)).unwrap();
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    let trace_id = format!("\"trace_id\":\"{}\"", line["trace_id"].as_str().unwrap());
    for node in ["node1", "node2"] {
        let agent = cluster.agent(node).unwrap();
        logged(|| agent.log(), &trace_id).await;
    }

    // Around the waypoint, to the pod itself: refused by the destination, saying why.
    assert_eq!(greeting(&cluster, "client", server).await, None);
    let node2 = cluster.agent("node2").unwrap();
    let around = "the destination is behind a waypoint and the connection did not come through it";
    logged(|| node2.log(), around).await;
    let output = node2
        .debug(&[
            "check",
            "--from",
            "shop/client",
            "--to",
            "shop/server:8080",
            "-o",
            "json",
        ])
        .unwrap();
    let check: CheckView = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(check.waypoints, ["shop/waypoint"]);
    assert!(!check.allowed);
    let output = node2.debug(&["services", "-o", "json"]).unwrap();
    let services: Vec<ServiceView> = serde_json::from_slice(&output.stdout).unwrap();
    let bound = services.iter().find(|s| s.name == "server").unwrap();
    assert_eq!(bound.waypoint.as_deref(), Some("shop/waypoint"));

    // The destination's L4 policies see the waypoint's identity.
    let deny_waypoint = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-waypoint, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]
";
    cluster.set_extra_objects(&objects(&cluster, deny_waypoint));
    cluster.apply().await.unwrap();
    assert_eq!(greeting(&cluster, "client", vip).await, None);
    let node2 = cluster.agent("node2").unwrap();
    logged(|| node2.log(), "\"policy\":\"shop/no-waypoint\"").await;

    // A policy on the Service is the waypoint's to enforce, on TCP ports too.
    let admins_only = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: server}]
  rules: [{from: [{source: {namespaces: [ops]}}]}]
";
    cluster.set_extra_objects(&objects(&cluster, admins_only));
    cluster.apply().await.unwrap();
    assert_eq!(greeting(&cluster, "client", vip).await, None);
    let waypoint = cluster.waypoint("waypoint").unwrap();
    logged(|| waypoint.log(), "denied by the ALLOW policies").await;
    let peer = greeting(&cluster, "admin", vip).await;
    assert_eq!(peer.as_deref(), Some(waypoint_ip.to_string().as_str()));

    // An open connection is held to the policies in force: one that now denies it closes it.
    let mut held = cluster.in_pod("admin").unwrap().connect(vip).await.unwrap();
    read_peer_line(&mut held).await.unwrap();
    cluster.set_extra_objects(&objects(&cluster, &admins_only.replace("[ops]", "[audit]")));
    cluster.apply().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), held.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the held connection stayed open");
    let waypoint = cluster.waypoint("waypoint").unwrap();
    logged(|| waypoint.log(), "closed: a policy change denies it").await;
}

const HTTP_PORT: u16 = 8081;
const H2_PORT: u16 = 8082;

/// One request from the client to `addr`: the status and the body.
async fn request(
    cluster: &Cluster,
    addr: SocketAddr,
    http2: bool,
    method: &str,
    path: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = cluster
        .in_pod("client")
        .unwrap()
        .connect(addr)
        .await
        .unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let request = http::Request::builder()
        .method(method)
        .uri(format!(
            "http://web.shop.svc.cluster.local:{}{path}",
            addr.port()
        ))
        .header(http::header::HOST, "web.shop.svc.cluster.local")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An app that resets its connection mid-answer: through the waypoint, the client's connection
/// is reset too, not closed as if the answer were complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_the_app_reaches_the_client_through_the_waypoint() {
    let cluster = bound_to_waypoint().await;
    let server = cluster.in_pod("server").unwrap();
    tokio::spawn(serve_cut_off(server.listen(APP_PORT).await.unwrap()));
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    assert_cut_off_is_reset(&cluster.in_pod("client").unwrap(), vip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_decides_each_http_request_and_counts_it() {
    let mut cluster = two_teams()
        .waypoint("node1", "shop", "waypoint", "service")
        .start()
        .await
        .unwrap();
    let ip = cluster.addr("server", HTTP_PORT).unwrap().ip();
    let objects = format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {{istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}
  - {{name: grpc, port: 81, targetPort: {H2_PORT}, appProtocol: http2}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]
ports: [{{name: http, port: {HTTP_PORT}}}, {{name: grpc, port: {H2_PORT}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reads-only, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]
    to: [{{operation: {{methods: [GET], paths: [/allowed*]}}}}]
"
    );
    cluster.set_extra_objects(&objects);
    cluster.apply().await.unwrap();
    let server = cluster.in_pod("server").unwrap();
    let _apps = [
        server.http(HTTP_PORT, false).await.unwrap(),
        server.http(H2_PORT, true).await.unwrap(),
    ];
    let http1: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let http2: SocketAddr = "10.96.0.20:81".parse().unwrap();

    let waypoint = cluster.waypoint("waypoint").unwrap();
    assert_eq!(
        request(&cluster, http1, false, "GET", "/allowed/1").await,
        (200, "GET /allowed/1".to_owned()),
        "{}\n{}",
        cluster.logs(),
        waypoint.log()
    );
    assert_eq!(
        request(&cluster, http1, false, "GET", "/admin").await,
        (403, "RBAC: access denied".to_owned())
    );
    assert_eq!(
        request(&cluster, http1, false, "POST", "/allowed/1")
            .await
            .0,
        403
    );
    assert_eq!(
        request(&cluster, http2, true, "GET", "/allowed/2").await,
        (200, "GET /allowed/2".to_owned()),
        "{}",
        waypoint.log()
    );
    assert_eq!(request(&cluster, http2, true, "GET", "/admin").await.0, 403);

    // Istio's request metrics, from the waypoint; a body is observed once it has ended, which
    // the waypoint sees just after the client does.
    let metrics_addr = SocketAddr::new(cluster.addr("waypoint", 0).unwrap().ip(), 15020);
    let sum = |metrics: &str, metric: &str, code: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{reporter=\"waypoint\"")))
            .filter(|l| l.contains(&format!("response_code=\"{code}\"")))
            .filter(|l| l.contains("source_workload=\"client\""))
            .filter(|l| l.contains("destination_service=\"web.shop.svc.cluster.local\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    // `GET /allowed/1` and `GET /allowed/2` are answered with 14 bytes each.
    let expected = [
        ("istio_requests_total", "200", 2.0),
        ("istio_requests_total", "403", 3.0),
        ("istio_request_bytes_count", "200", 2.0),
        ("istio_response_bytes_sum", "200", 28.0),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = cluster
            .agent("node1")
            .unwrap()
            .get_from(metrics_addr, "/metrics")
            .await
            .unwrap()
            .unwrap();
        let counted = expected
            .iter()
            .all(|(metric, code, value)| sum(&metrics, metric, code) == *value);
        if counted && metrics.contains("istio_request_duration_milliseconds_bucket{") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
