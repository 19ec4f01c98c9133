//! The agents with `--source kubernetes`, against the fake API server: the mesh works as with
//! the file source, and what only a cluster has works too: labels changed through the API, an
//! API server that restarts or answers 410 Gone, the redirection annotation, Events, and pods
//! found by their processes rather than by an address any pod can claim.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_agent::lab::{CgroupLayout, Cluster, ClusterBuilder, EchoApp, read_peer_line};
use ambit_integration::{
    ALLOW_CLIENT, PacketCapture, STRICT_SHOP, agent_listens_in, logged, two_teams,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const REDIRECTION: &str = "ambient.istio.io/redirection";
/// [`ALLOW_CLIENT`], changed to let `admin` in too.
const ALLOW_CLIENT_AND_ADMIN: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client, cluster.local/ns/ops/sa/admin]}}]}]
";

fn fake_apiserver() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-apiserver"))
}

/// [`two_teams`], read from an API server.
fn in_kubernetes() -> ClusterBuilder {
    two_teams().kubernetes(&fake_apiserver())
}

/// A client of the cluster's API server, as `kubectl` would be.
async fn api(cluster: &Cluster) -> Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig().unwrap()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Sends a line from `from` to the echo app of `to`: the client address the app saw, or `None`
/// when the connection is refused or unanswered.
async fn exchange(cluster: &Cluster, from: &str, to: &str) -> Option<String> {
    let attempt = async {
        let mut stream = cluster
            .in_pod(from)
            .unwrap()
            .connect(cluster.addr(to, APP_PORT).unwrap())
            .await?;
        let peer = read_peer_line(&mut stream).await?;
        stream.write_all(b"ping\n").await?;
        let mut echoed = [0; 5];
        stream.read_exact(&mut echoed).await?;
        Ok::<_, std::io::Error>(peer)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()?
        .ok()
}

fn ip(cluster: &Cluster, pod: &str) -> String {
    cluster.pod(pod).unwrap().ip.to_string()
}

async fn echo(cluster: &Cluster, pod: &str) -> EchoApp {
    cluster.in_pod(pod).unwrap().echo(APP_PORT).await.unwrap()
}

/// Whether the agent's proxies listen in `pod`: it is enrolled.
fn enrolled(cluster: &Cluster, pod: &str) -> bool {
    agent_listens_in(cluster.pod(pod).unwrap())
}

async fn within(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits up to 10 s for `condition`; fails the test, saying `what` and showing the logs, if it
/// never holds.
async fn eventually(cluster: &Cluster, what: &str, condition: impl AsyncFnMut() -> bool) {
    let held = within(Duration::from_secs(10), condition).await;
    assert!(held, "{what}\n{}", cluster.logs());
}

/// The pod's redirection annotation, as the API server has it.
async fn redirection(pods: &Api<Pod>, name: &str) -> Option<String> {
    let pod = pods.get(name).await.unwrap();
    pod.metadata.annotations?.remove(REDIRECTION)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_works_as_with_the_file_source() {
    let cluster = in_kubernetes()
        .pod("node2", "shop", "neighbour")
        .objects(&format!("{STRICT_SHOP}{ALLOW_CLIENT}"))
        .start()
        .await
        .unwrap();
    let _server = echo(&cluster, "server").await;
    let _neighbour = echo(&cluster, "neighbour").await;
    let underlay = PacketCapture::start(cluster.topology().underlay(), "n1", "tcp").unwrap();

    let peer = exchange(&cluster, "client", "server").await;
    assert_eq!(peer, Some(ip(&cluster, "client")), "{}", cluster.logs());
    let packets = underlay.stop().unwrap();
    assert!(
        packets.windows(2).any(|w| w == 15008u16.to_be_bytes()),
        "no HBONE on the underlay"
    );
    assert!(
        !packets.windows(5).any(|w| w == b"ping\n"),
        "plaintext crossed the underlay"
    );
    assert_eq!(
        exchange(&cluster, "server", "neighbour").await,
        Some(ip(&cluster, "server")),
        "same node"
    );
    assert_eq!(
        exchange(&cluster, "admin", "server").await,
        None,
        "denied\n{}",
        cluster.logs()
    );
    assert_eq!(
        exchange(&cluster, "outsider", "server").await,
        None,
        "STRICT refuses plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_and_pods_follow_the_api() {
    let mut cluster = in_kubernetes().namespace("late").start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(api(&cluster).await, "shop");
    eventually(&cluster, "a captured pod is annotated", async || {
        redirection(&pods, "server").await.as_deref() == Some("enabled")
    })
    .await;

    // A namespace labelled at runtime: its pods are captured; unlabelled: released.
    cluster
        .add_pod_namespace("node1", "late", "newcomer")
        .unwrap();
    cluster.apply().await.unwrap();
    assert!(!enrolled(&cluster, "newcomer"));
    cluster.set_namespace_ambient("late", true);
    cluster.apply().await.unwrap();
    let late: Api<Pod> = Api::namespaced(api(&cluster).await, "late");
    eventually(&cluster, "captured once labelled", async || {
        enrolled(&cluster, "newcomer") && redirection(&late, "newcomer").await.is_some()
    })
    .await;
    cluster.set_namespace_ambient("late", false);
    cluster.apply().await.unwrap();
    eventually(&cluster, "released, annotation and all", async || {
        !enrolled(&cluster, "newcomer") && redirection(&late, "newcomer").await.is_none()
    })
    .await;

    // A pod relabelled out of the mesh, then one deleted.
    cluster.opt_out_pod("client");
    cluster.apply().await.unwrap();
    eventually(&cluster, "released once opted out", async || {
        !enrolled(&cluster, "client")
    })
    .await;
    cluster.unlist_pod("server");
    cluster.apply().await.unwrap();
    eventually(&cluster, "released once deleted", async || {
        !enrolled(&cluster, "server")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_restarts_or_forgets_loses_nothing() {
    let mut cluster = in_kubernetes().objects(ALLOW_CLIENT).start().await.unwrap();
    let _server = echo(&cluster, "server").await;
    let holds = async |cluster: &Cluster| {
        enrolled(cluster, "client")
            && enrolled(cluster, "server")
            && exchange(cluster, "client", "server").await == Some(ip(cluster, "client"))
            && exchange(cluster, "admin", "server").await.is_none()
    };

    // Restarted, it remembers no version the agents saw: they relist (410 Gone), and keep
    // everything meanwhile.
    cluster.restart_apiserver().await.unwrap();
    assert!(holds(&cluster).await, "{}", cluster.logs());
    cluster.set_pod_label("admin", "tier", "ops");
    cluster.apply().await.unwrap();
    assert!(holds(&cluster).await, "{}", cluster.logs());

    // Its history compacted, every watch ends and resumes with a relist.
    let client = api(&cluster).await;
    client
        .request_text(
            http::Request::post("/fake/compact")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(holds(&cluster).await, "{}", cluster.logs());
    cluster.set_pod_label("admin", "tier", "platform");
    cluster.apply().await.unwrap();
    // A change, not a removal: the lab tells that the agents have a change by the versions of
    // the objects they received, and an object deleted while a watch relists leaves none.
    cluster.set_extra_objects(ALLOW_CLIENT_AND_ADMIN);
    cluster.apply().await.unwrap();
    assert_eq!(
        exchange(&cluster, "admin", "server").await,
        Some(ip(&cluster, "admin")),
        "the policy's change reached the agents\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_read_the_cluster_enrols_nothing() {
    let mut cluster = in_kubernetes().start().await.unwrap();
    let _server = echo(&cluster, "server").await;
    cluster.stop_apiserver();
    cluster.kill_agent("node1");
    cluster.launch_agent("node1").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The new agent has no policies to enforce: it opens no proxy, and is not ready; the
    // capture its predecessor left fails closed meanwhile.
    assert!(!cluster.agent("node1").unwrap().is_ready().await.unwrap());
    assert!(!enrolled(&cluster, "client"));
    assert_eq!(exchange(&cluster, "client", "server").await, None);
    // The agent that had read the cluster keeps what it knew.
    assert!(cluster.agent("node2").unwrap().is_ready().await.unwrap());
    assert!(enrolled(&cluster, "server"));

    cluster.restart_apiserver().await.unwrap();
    let agent = cluster.agent_mut("node1").unwrap();
    agent.wait_ready().await.unwrap();
    assert_eq!(
        exchange(&cluster, "client", "server").await,
        Some(ip(&cluster, "client")),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_crds_the_agent_works_and_waits_for_them() {
    let mut cluster = in_kubernetes().without_istio_crds().start().await.unwrap();
    let _server = echo(&cluster, "server").await;
    assert!(
        exchange(&cluster, "admin", "server").await.is_some(),
        "{}",
        cluster.logs()
    );
    logged(|| cluster.logs(), "are Istio's CRDs installed?").await;
    // The CRDs and a policy arrive together: the agents find them on their next try.
    cluster.set_istio_crds(true);
    cluster.set_extra_objects(ALLOW_CLIENT);
    cluster.write_config().unwrap();
    assert!(
        within(Duration::from_secs(40), async || exchange(
            &cluster, "admin", "server"
        )
        .await
        .is_none())
        .await,
        "{}",
        cluster.logs()
    );
    assert!(exchange(&cluster, "client", "server").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_claiming_another_pods_address_is_not_enrolled_as_it() {
    // `victim` runs on node1; `impostor`, outside the mesh, adds the victim's IP to its own
    // interface. The agent finds the victim by its processes, never by the address.
    let mut cluster = in_kubernetes()
        .pod("node1", "legacy", "impostor")
        .start()
        .await
        .unwrap();
    let client_ip = ip(&cluster, "client");
    let impostor = cluster.pod("impostor").unwrap().netns.clone();
    let status = Command::new("ip")
        .args([
            "-n",
            &impostor,
            "addr",
            "add",
            &format!("{client_ip}/32"),
            "dev",
            "lo",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // A new pod whose only process is not there yet, and whose IP the impostor also claims.
    cluster.add_pod_namespace("node1", "shop", "ghost").unwrap();
    cluster.stop_pod_process("ghost");
    let ghost_ip = ip(&cluster, "ghost");
    let status = Command::new("ip")
        .args([
            "-n",
            &impostor,
            "addr",
            "add",
            &format!("{ghost_ip}/32"),
            "dev",
            "lo",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    cluster.apply().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!enrolled(&cluster, "ghost"), "enrolled by its address");
    assert!(
        !enrolled(&cluster, "impostor"),
        "the impostor was enrolled as another pod"
    );
    assert!(enrolled(&cluster, "client"));

    // A process of the client in the impostor's namespace: two candidates, refused.
    let uid = cluster.pod("client").unwrap().uid.clone();
    let _stray = cluster
        .topology()
        .start_process_of_pod_in(&uid, &impostor, CgroupLayout::Systemd)
        .unwrap();
    cluster
        .start_pod_process("ghost", CgroupLayout::Cgroupfs)
        .unwrap();
    let _second = cluster
        .topology()
        .start_process_of_pod_in(
            &cluster.pod("ghost").unwrap().uid,
            &impostor,
            CgroupLayout::Cgroupfs,
        )
        .unwrap();
    let agent = cluster.agent("node1").unwrap();
    eventually(&cluster, "the ambiguous pod is refused", async || {
        let output = agent.debug(&["workloads"]).unwrap();
        let table = String::from_utf8_lossy(&output.stdout).into_owned();
        table.contains("refused")
            && agent
                .metrics()
                .await
                .unwrap()
                .contains("ambit_refused_pods 1")
    })
    .await;
    assert!(!enrolled(&cluster, "ghost"));
    let events: Api<Event> = Api::namespaced(api(&cluster).await, "shop");
    eventually(&cluster, "an Event on the refused pod", async || {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("CaptureRefused")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ghost")
            })
    })
    .await;
}
