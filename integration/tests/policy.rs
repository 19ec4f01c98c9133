//! AuthorizationPolicy and PeerAuthentication enforced end to end on the namespace mesh.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::io;
use std::time::Duration;

use ambit_agent::lab::{Cluster, EchoApp, read_peer_line};
use ambit_integration::{ALLOW_CLIENT, STRICT_SHOP, assert_closed, logged, two_teams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const METRICS_PORT: u16 = 9090;

/// [`two_teams`] with `policies`; the server listens on both app ports.
async fn cluster(policies: &str) -> (Cluster, Vec<EchoApp>) {
    let cluster = two_teams().objects(policies).start().await.unwrap();
    let server = cluster.in_pod("server").unwrap();
    let apps = vec![
        server.echo(APP_PORT).await.unwrap(),
        server.echo(METRICS_PORT).await.unwrap(),
    ];
    (cluster, apps)
}

/// Replaces the cluster's policies and waits until every agent has loaded them.
async fn set_policies(cluster: &mut Cluster, policies: &str) {
    cluster.set_extra_objects(policies);
    cluster.apply().await.unwrap();
}

/// Whether `from` gets through to the server's app on `port`: the app greets every client.
async fn reaches(cluster: &Cluster, from: &str, port: u16) -> bool {
    let attempt = async {
        let mut stream = cluster
            .in_pod(from)
            .unwrap()
            .connect(cluster.addr("server", port).unwrap())
            .await?;
        read_peer_line(&mut stream).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_by_principal_and_nobody_else() {
    let (cluster, _apps) = cluster(ALLOW_CLIENT).await;
    assert!(
        reaches(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
    assert!(!reaches(&cluster, "admin", APP_PORT).await);
    assert!(
        !reaches(&cluster, "outsider", APP_PORT).await,
        "plaintext has no principal"
    );
    // The denial is in the access log.
    logged(|| cluster.logs(), r#""response_flags":"DENY""#).await;
}

/// A client that speaks first and is denied is reset: its request went with the CONNECT and
/// reached nothing, and a clean end of stream could pass for an empty answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_client_that_spoke_first_is_reset() {
    let (cluster, apps) = cluster(ALLOW_CLIENT).await;
    let mut stream = cluster
        .in_pod("admin")
        .unwrap()
        .connect(cluster.addr("server", APP_PORT).unwrap())
        .await
        .unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut [0; 64])).await;
    assert_eq!(
        answer.unwrap().map_err(|error| error.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    assert_eq!(apps[0].accepted(), 0, "the app was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_by_namespace() {
    let (cluster, _apps) = cluster(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [ops]}}]}]
",
    )
    .await;
    assert!(!reaches(&cluster, "admin", APP_PORT).await);
    assert!(
        reaches(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
    logged(|| cluster.logs(), r#""policy":"istio-system/no-ops""#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_by_port() {
    let (cluster, _apps) = cluster(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-metrics, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ['9090']}}]}]
",
    )
    .await;
    assert!(!reaches(&cluster, "client", METRICS_PORT).await);
    assert!(
        reaches(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_from_outside_the_mesh() {
    let (cluster, _apps) = cluster(STRICT_SHOP).await;
    assert!(!reaches(&cluster, "outsider", APP_PORT).await);
    assert!(
        reaches(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_port_under_a_strict_workload() {
    let (cluster, _apps) = cluster(
        "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: server, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
  portLevelMtls: {9090: {mode: PERMISSIVE}}
",
    )
    .await;
    assert!(
        reaches(&cluster, "outsider", METRICS_PORT).await,
        "{}",
        cluster.logs()
    );
    assert!(!reaches(&cluster, "outsider", APP_PORT).await);
}

/// A connection from `from` to the server's app, past the app's greeting.
async fn open_connection(cluster: &Cluster, from: &str) -> TcpStream {
    let mut open = cluster
        .in_pod(from)
        .unwrap()
        .connect(cluster.addr("server", APP_PORT).unwrap())
        .await
        .unwrap();
    read_peer_line(&mut open).await.unwrap();
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_added_at_runtime_closes_an_open_connection() {
    let (mut cluster, _apps) = cluster("").await;
    let open = open_connection(&cluster, "client").await;
    set_policies(
        &mut cluster,
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lockdown, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
",
    )
    .await;
    assert_closed(&cluster, open).await;
    assert!(!reaches(&cluster, "client", APP_PORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_strict_at_runtime_closes_open_plaintext_connections() {
    let (mut cluster, _apps) = cluster("").await;
    let open = open_connection(&cluster, "outsider").await;
    set_policies(&mut cluster, STRICT_SHOP).await;
    assert_closed(&cluster, open).await;
}
