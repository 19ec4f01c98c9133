//! Pods started through the `ambit-cni` plugin, run exactly as a container runtime runs it
//! (environment, network configuration with `prevResult` on stdin) against pod namespaces the
//! test creates, with the agents reading the cluster from the fake API server.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ambit_agent::lab::topology::PodNs;
use ambit_agent::lab::{Cluster, ClusterBuilder, EchoApp, read_peer_line};
use ambit_integration::{agent_listens_in, cni_binary, logged, two_teams};

const APP_PORT: u16 = 8080;

fn fake_apiserver() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-apiserver"))
}

/// Runs the plugin for `pod` as a runtime does once the primary network is set up.
fn plugin(cluster: &Cluster, command: &str, pod: &PodNs) -> Output {
    let netconf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "type": "ambit-cni",
        "agentSocket": cluster.cni_socket(&pod.node),
        "kubeconfig": cluster.kubeconfig().unwrap(),
        "timeoutSeconds": 20,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
            "ips": [{"address": format!("{}/32", pod.ip), "interface": 0}],
        },
    });
    let mut child = Command::new(cni_binary())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={};K8S_POD_INFRA_CONTAINER_ID=sandbox",
                pod.namespace, pod.name, pod.uid
            ),
        )
        .env("CNI_PATH", Path::new("/opt/cni/bin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(netconf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Removes every trace of capture from the pod, behind the agent's back: either backend's
/// programs or table, and ambit's routing rules (priorities 32760 to 32764).
fn remove_capture(pod: &PodNs) {
    let in_pod = |command: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .args(command)
            .output()
            .unwrap()
    };
    in_pod(&["tc", "filter", "del", "dev", "eth0", "ingress"]);
    in_pod(&["nft", "delete", "table", "inet", "ambit"]);
    for priority in 32760..=32764 {
        for family in ["-4", "-6"] {
            in_pod(&[
                "ip",
                family,
                "rule",
                "del",
                "priority",
                &priority.to_string(),
            ]);
        }
    }
}

async fn eventually(cluster: &Cluster, what: &str, condition: impl Fn() -> bool) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}\n{}", cluster.logs());
}

/// The first line the server's echo app answers `from` with: the client address it saw.
async fn first_connection(cluster: &Cluster, from: &str) -> Option<String> {
    let attempt = async {
        let mut stream = cluster
            .in_pod(from)
            .unwrap()
            .connect(cluster.addr("server", APP_PORT).unwrap())
            .await?;
        read_peer_line(&mut stream).await
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()?
        .ok()
}

/// Asserts that `pod`'s first connection to the STRICT server is tunneled (plaintext would be
/// refused) and keeps the pod's address.
async fn reaches_the_server_as_itself(cluster: &Cluster, pod: &PodNs) {
    assert_eq!(
        first_connection(cluster, &pod.name).await,
        Some(pod.ip.to_string()),
        "{}",
        cluster.logs()
    );
}

/// `cluster` read from the fake API server, STRICT in `shop`, with the server's echo app.
async fn mesh(cluster: ClusterBuilder) -> (Cluster, EchoApp) {
    let cluster = cluster
        .kubernetes(&fake_apiserver())
        .objects(ambit_integration::STRICT_SHOP)
        .start()
        .await
        .unwrap();
    let server = cluster.in_pod("server").unwrap();
    let server = server.echo(APP_PORT).await.unwrap();
    (cluster, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_captured_before_its_add_returns() {
    let (mut cluster, _server) = mesh(two_teams()).await;
    let late = cluster.add_sandbox("node1", "shop", "late").unwrap();
    let bystander = cluster.add_sandbox("node1", "legacy", "bystander").unwrap();
    cluster.apply().await.unwrap();

    // ADD returns once capture is in place: the pod's very first connection is tunneled (the
    // server is STRICT, so plaintext would be refused) and keeps the pod's address.
    let added = plugin(&cluster, "ADD", &late);
    assert!(added.status.success(), "{}", describe(&added));
    let result: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], format!("{}/32", late.ip));
    assert_eq!(
        first_connection(&cluster, "late").await,
        Some(late.ip.to_string()),
        "{}",
        cluster.logs()
    );
    let workloads = cluster
        .agent("node1")
        .unwrap()
        .debug(&["workloads"])
        .unwrap();
    let workloads = String::from_utf8_lossy(&workloads.stdout).into_owned();
    assert!(
        workloads
            .lines()
            .any(|row| row.contains("late") && row.ends_with("captured (cni)")),
        "the debug view says the plugin's path enrolled it:\n{workloads}\n{}",
        cluster.logs()
    );
    // A pod outside the mesh is answered at once, and left alone.
    let added = plugin(&cluster, "ADD", &bystander);
    assert!(added.status.success(), "{}", describe(&added));
    assert!(!agent_listens_in(&bystander));

    // CHECK sees capture removed behind the agent's back.
    let checked = plugin(&cluster, "CHECK", &late);
    assert!(checked.status.success(), "{}", describe(&checked));
    remove_capture(&late);
    let checked = plugin(&cluster, "CHECK", &late);
    assert!(!checked.status.success(), "{}", describe(&checked));

    // DEL releases.
    let deleted = plugin(&cluster, "DEL", &late);
    assert!(deleted.status.success(), "{}", describe(&deleted));
    eventually(&cluster, "released after DEL", || !agent_listens_in(&late)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_agent_a_node_starts_no_pod_of_the_mesh() {
    let (mut cluster, _server) = mesh(two_teams()).await;
    let late = cluster.add_sandbox("node1", "shop", "late").unwrap();
    let bystander = cluster.add_sandbox("node1", "legacy", "bystander").unwrap();
    cluster.apply().await.unwrap();
    // As after a reboot: no agent runs on node1.
    cluster.kill_agent("node1");

    let refused = plugin(&cluster, "ADD", &late);
    assert!(!refused.status.success(), "{}", describe(&refused));
    let error: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(error["code"], 11, "try again later: {error}");
    let outside = plugin(&cluster, "ADD", &bystander);
    assert!(outside.status.success(), "{}", describe(&outside));
    // DEL never wedges a pod's deletion.
    let deleted = plugin(&cluster, "DEL", &bystander);
    assert!(deleted.status.success(), "{}", describe(&deleted));

    // The agent is back: the runtime's retried ADD succeeds, and the first connection is
    // tunneled.
    cluster.start_agent("node1").await.unwrap();
    let added = plugin(&cluster, "ADD", &late);
    assert!(added.status.success(), "{}", describe(&added));
    assert_eq!(
        first_connection(&cluster, "late").await,
        Some(late.ip.to_string()),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_watch_has_not_brought_is_fetched() {
    // Watches lag a minute behind, as behind a slow watch cache: the agent learns of the new
    // pod only by asking the API server.
    let slow_watches = two_teams().apiserver_args(&["--watch-delay-ms", "60000"]);
    let (mut cluster, _server) = mesh(slow_watches).await;
    let late = cluster.add_sandbox("node1", "shop", "late").unwrap();
    cluster.publish().await.unwrap();

    let added = plugin(&cluster, "ADD", &late);
    assert!(added.status.success(), "{}", describe(&added));
    reaches_the_server_as_itself(&cluster, &late).await;
}

/// After an upgrade, the new agent answers the plugin on the socket the old one handed over, and
/// keeps the pods the old one captured through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_the_new_agent_answers_the_plugin() {
    let (mut cluster, _server) = mesh(two_teams()).await;
    let early = cluster.add_sandbox("node1", "shop", "early").unwrap();
    cluster.apply().await.unwrap();
    let added = plugin(&cluster, "ADD", &early);
    assert!(added.status.success(), "{}", describe(&added));

    cluster.replace_agent("node1", &[]).await.unwrap();
    // The CNI socket is among the listeners handed over.
    let agent = cluster.agent("node1").unwrap();
    logged(|| agent.log(), "took over from the running agent").await;
    let log = agent.log();
    let received = log
        .lines()
        .find(|l| l.contains("received the running agent's listeners"));
    assert!(
        received.is_some_and(|l| l.contains(r#""listeners":5"#)),
        "{log}"
    );
    reaches_the_server_as_itself(&cluster, &early).await;

    let late = cluster.add_sandbox("node1", "shop", "late").unwrap();
    cluster.apply().await.unwrap();
    let added = plugin(&cluster, "ADD", &late);
    assert!(added.status.success(), "{}", describe(&added));
    reaches_the_server_as_itself(&cluster, &late).await;
}
