//! In-pod capture on a two-node mesh of network namespaces, end to end, with each backend:
//! every test runs once as `ebpf::<test>` and once as `nftables::<test>`.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_agent::lab::{Cluster, EchoApp, InPod, read_peer_line};
use ambit_integration::{Backend, PacketCapture, STRICT_SHOP, agent_binary, with_each_backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
/// client and server-local on node1, server on node2, all in the mesh; db outside it on node2;
/// debug opted out on node1.
async fn cluster(backend: Backend) -> Cluster {
    Cluster::builder(&agent_binary())
        .agent_args(&["--redirect", backend.flag()])
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("legacy")
        .pod("node1", "shop", "client")
        .pod("node1", "shop", "local")
        .pod("node2", "shop", "server")
        .pod("node2", "legacy", "db")
        .opted_out_pod("node1", "shop", "debug")
        .start()
        .await
        .unwrap()
}

/// Sends `payload` from `from` to the echo app of `to` and returns the client address the app
/// saw.
async fn round_trip(cluster: &Cluster, from: &str, to: &str, payload: &[u8]) -> String {
    let exchange = async {
        let mut stream = cluster
            .in_pod(from)
            .unwrap()
            .connect(cluster.addr(to, APP_PORT).unwrap())
            .await?;
        let peer = read_peer_line(&mut stream).await?;
        stream.write_all(payload).await?;
        let mut echoed = vec![0; payload.len()];
        stream.read_exact(&mut echoed).await?;
        Ok::<_, std::io::Error>((peer, echoed))
    };
    match tokio::time::timeout(Duration::from_secs(20), exchange).await {
        Ok(Ok((peer, echoed))) => {
            assert_eq!(echoed, payload, "{from} -> {to}: echo differs");
            peer
        }
        Ok(Err(error)) => panic!("{from} -> {to}: {error}\n{}", cluster.logs()),
        Err(_) => panic!("{from} -> {to}: no answer in 20 s\n{}", cluster.logs()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The 15008 port in a TCP header, as either source or destination.
fn has_hbone_packets(capture: &[u8]) -> bool {
    contains(capture, &15008u16.to_be_bytes())
}

/// What `command` prints when run in `pod`'s namespace.
fn run_in(cluster: &Cluster, pod: &str, command: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &cluster.pod(pod).unwrap().netns])
        .args(command)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How many copies of `backend`'s capture `pod` holds: its table or its filter, and its routing
/// rule.
fn captures(backend: Backend, cluster: &Cluster, pod: &str) -> (usize, usize) {
    let (capture, rule) = match backend {
        Backend::Nftables => (
            nft_tables(cluster, pod).matches("table inet ambit").count(),
            "fwmark 0x111/0xfff lookup 100",
        ),
        Backend::Ebpf => (
            run_in(
                cluster,
                pod,
                &["tc", "filter", "show", "dev", "eth0", "ingress"],
            )
            .lines()
            .filter(|l| l.contains("ambit_inbound"))
            .count(),
            "ipproto tcp lookup 100",
        ),
    };
    let rules = ip_rules(cluster, pod).matches(rule).count();
    (capture, rules)
}

/// Whether anything of either backend is left in `pod`: a table, a filter, a rule of ambit's.
fn traces(cluster: &Cluster, pod: &str) -> Vec<String> {
    let mut traces: Vec<String> = nft_tables(cluster, pod)
        .lines()
        .map(str::to_owned)
        .collect();
    let filters = run_in(
        cluster,
        pod,
        &["tc", "filter", "show", "dev", "eth0", "ingress"],
    );
    traces.extend(
        filters
            .lines()
            .filter(|l| l.contains("ambit"))
            .map(str::to_owned),
    );
    let rules = ip_rules(cluster, pod);
    // ambit's rules have the priorities 32760 to 32764.
    let ours = |line: &&str| {
        line.split_once(':')
            .and_then(|(priority, _)| priority.parse::<u32>().ok())
            .is_some_and(|priority| (32760..=32764).contains(&priority))
    };
    traces.extend(rules.lines().filter(ours).map(str::to_owned));
    let table = run_in(cluster, pod, &["ip", "route", "show", "table", "100"]);
    traces.extend(table.lines().map(str::to_owned));
    traces
}

fn nft_tables(cluster: &Cluster, pod: &str) -> String {
    run_in(cluster, pod, &["nft", "list", "tables"])
}

fn ip_rules(cluster: &Cluster, pod: &str) -> String {
    let v4 = run_in(cluster, pod, &["ip", "rule", "show"]);
    v4 + &run_in(cluster, pod, &["ip", "-6", "rule", "show"])
}

fn listening_ports(cluster: &Cluster, pod: &str) -> String {
    run_in(cluster, pod, &["ss", "-Hltn"])
}

/// How many link subscriptions (rtnetlink sockets in the link group) `pod`'s namespace holds:
/// the eBPF backend's watcher of that pod's interfaces, or none.
fn link_subscriptions(cluster: &Cluster, pod: &str) -> usize {
    // `sk Eth Pid Groups ...`: NETLINK_ROUTE is 0, the link group 1.
    run_in(cluster, pod, &["cat", "/proc/thread-self/net/netlink"])
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&"0") && fields.get(3) == Some(&"00000001")
        })
        .count()
}

/// The pod's IP, as the echo app reports a client.
fn ip(cluster: &Cluster, pod: &str) -> String {
    cluster.pod(pod).unwrap().ip.to_string()
}

async fn echo(cluster: &Cluster, pod: &str) -> EchoApp {
    cluster.in_pod(pod).unwrap().echo(APP_PORT).await.unwrap()
}

fn marker() -> Vec<u8> {
    format!("ambit-plaintext-marker-{:032x}", fastrand_u128()).into_bytes()
}

fn fastrand_u128() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Polls `condition` until it holds or `limit` passes; returns how long it took.
async fn within(limit: Duration, condition: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn cross_node_traffic_is_tunneled_and_keeps_the_client_ip(backend: Backend) {
    let cluster = cluster(backend).await;
    let _server = echo(&cluster, "server").await;
    let capture = PacketCapture::start(cluster.topology().underlay(), "n1", "tcp").unwrap();

    let payload = marker();
    let peer = round_trip(&cluster, "client", "server", &payload).await;

    let packets = capture.stop().unwrap();
    assert_eq!(peer, ip(&cluster, "client"), "the app sees the client pod");
    assert!(
        !contains(&packets, &payload),
        "plaintext crossed the underlay"
    );
    assert!(has_hbone_packets(&packets), "no HBONE on the underlay");
}

async fn same_node_traffic_is_tunneled_too(backend: Backend) {
    let cluster = cluster(backend).await;
    let _local = echo(&cluster, "local").await;
    let node1 = cluster.topology().nodes()[0].netns.clone();
    let capture = PacketCapture::start(&node1, "any", "tcp").unwrap();

    let payload = marker();
    let peer = round_trip(&cluster, "client", "local", &payload).await;

    let packets = capture.stop().unwrap();
    assert_eq!(peer, ip(&cluster, "client"));
    assert!(!contains(&packets, &payload), "plaintext between the pods");
    assert!(has_hbone_packets(&packets));
}

async fn traffic_to_and_from_pods_outside_the_mesh_still_works(backend: Backend) {
    let cluster = cluster(backend).await;
    let _db = echo(&cluster, "db").await;
    let _server = echo(&cluster, "server").await;

    let peer = round_trip(&cluster, "client", "db", b"to legacy").await;
    assert_eq!(peer, ip(&cluster, "client"));
    let peer = round_trip(&cluster, "db", "server", b"from legacy").await;
    assert_eq!(peer, ip(&cluster, "db"), "the app sees the real client");
}

async fn an_opted_out_pod_is_left_alone(backend: Backend) {
    let cluster = cluster(backend).await;
    assert_eq!(captures(backend, &cluster, "client"), (1, 1));
    assert_eq!(
        traces(&cluster, "debug"),
        Vec::<String>::new(),
        "no capture in an opted-out pod"
    );
    let listening = run_in(&cluster, "debug", &["ss", "-Hltnp"]);
    assert!(
        !listening.contains(":15001"),
        "{listening}\n{}",
        cluster.logs()
    );

    let _debug = echo(&cluster, "debug").await;
    let peer = round_trip(&cluster, "debug", "debug", b"self").await;
    assert_eq!(peer, ip(&cluster, "debug"));
    let peer = round_trip(&cluster, "client", "debug", b"plain").await;
    assert_eq!(peer, ip(&cluster, "client"));
}

async fn pods_are_enrolled_and_released_as_the_file_changes(backend: Backend) {
    let mut cluster = cluster(backend).await;
    cluster.add_pod_namespace("node2", "shop", "late").unwrap();
    cluster.write_config().unwrap();
    let enrolled = within(Duration::from_secs(5), || {
        captures(backend, &cluster, "late") == (1, 1)
            && listening_ports(&cluster, "late").contains(":15008")
    })
    .await;
    assert!(enrolled.is_some(), "never enrolled\n{}", cluster.logs());
    let watched = match backend {
        Backend::Ebpf => 1,
        Backend::Nftables => 0,
    };
    assert_eq!(link_subscriptions(&cluster, "late"), watched);

    let _late = echo(&cluster, "late").await;
    let peer = round_trip(&cluster, "client", "late", b"hello late").await;
    assert_eq!(peer, ip(&cluster, "client"));

    let agent = cluster.agent("node2").unwrap();
    let certificate = "identity=\"spiffe://cluster.local/ns/shop/sa/late\"";
    assert!(agent.metrics().await.unwrap().contains(certificate));

    cluster.unlist_pod("late");
    cluster.write_config().unwrap();
    let released = within(Duration::from_secs(5), || {
        traces(&cluster, "late").is_empty() && !listening_ports(&cluster, "late").contains(":150")
    })
    .await;
    assert!(released.is_some(), "never released\n{}", cluster.logs());
    let metrics = cluster.agent("node2").unwrap().metrics().await.unwrap();
    assert!(
        !metrics.contains(certificate),
        "the certificate of a released pod is still renewed\n{metrics}"
    );
    let stopped = within(Duration::from_secs(2), || {
        link_subscriptions(&cluster, "late") == 0
    })
    .await;
    assert!(
        stopped.is_some(),
        "the released pod's link watcher still runs"
    );
}

async fn a_dead_agent_fails_closed_and_a_new_one_resumes(backend: Backend) {
    let mut cluster = cluster(backend).await;
    let server = echo(&cluster, "server").await;
    round_trip(&cluster, "client", "server", b"before").await;
    let accepted_before = server.accepted();

    cluster.kill_agent("node2");

    // From a pod of the dead agent's node: nothing listens on 15001 any more.
    let refused = cluster
        .in_pod("server")
        .unwrap()
        .connect(cluster.addr("db", APP_PORT).unwrap())
        .await;
    assert!(
        refused.is_err(),
        "outbound from a captured pod must fail without its agent"
    );

    // Into a pod of the dead agent's node, tunneled or not: nothing reaches the app.
    if let Ok(mut stream) = cluster
        .in_pod("client")
        .unwrap()
        .connect(cluster.addr("server", APP_PORT).unwrap())
        .await
    {
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
        assert!(
            !matches!(read, Ok(Ok(1))),
            "data arrived from a pod whose agent is dead"
        );
    }
    let plain = tokio::time::timeout(
        Duration::from_secs(3),
        cluster
            .in_pod("db")
            .unwrap()
            .connect(cluster.addr("server", APP_PORT).unwrap()),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "plaintext got through to a pod whose agent is dead"
    );
    assert_eq!(
        server.accepted(),
        accepted_before,
        "the app accepted a connection without its agent"
    );

    cluster.start_agent("node2").await.unwrap();
    let peer = round_trip(&cluster, "client", "server", b"after").await;
    assert_eq!(peer, ip(&cluster, "client"));
    assert_eq!(
        captures(backend, &cluster, "server"),
        (1, 1),
        "no duplicate capture after the restart"
    );
}

/// A pod that left the mesh while its node had no agent is released by the next agent.
async fn capture_left_behind_is_removed_at_start(backend: Backend) {
    let mut cluster = cluster(backend).await;
    assert_eq!(captures(backend, &cluster, "server"), (1, 1));
    cluster.kill_agent("node2");
    cluster.opt_out_pod("server");
    // node1 learns that the server left the mesh; node2 has no agent to tell.
    cluster.apply().await.unwrap();
    cluster.start_agent("node2").await.unwrap();
    assert_eq!(
        traces(&cluster, "server"),
        Vec::<String>::new(),
        "{}",
        cluster.logs()
    );
    let _server = echo(&cluster, "server").await;
    let peer = round_trip(&cluster, "client", "server", b"plain again").await;
    assert_eq!(peer, ip(&cluster, "client"));
}

/// An interface added to a captured pod (a secondary network) is captured like its first one:
/// under STRICT, a plaintext SYN to the pod's address that arrives by it is answered by the
/// agent, which closes the connection, and never reaches the app. Uncaptured, the SYN would
/// reach the app (nftables without its table) or be dropped by the reverse-path check (eBPF
/// without the program and `accept_local` on the interface): either way the agent would not
/// answer. A SYN to the address of the new interface never reaches the app either: the agent
/// answers it (nftables), or the program drops it, as that address came after the pod was
/// captured (eBPF).
async fn an_interface_added_later_is_captured(backend: Backend) {
    let cluster = Cluster::builder(&agent_binary())
        .agent_args(&["--redirect", backend.flag()])
        .node("node1")
        .ambient_namespace("shop")
        .pod("node1", "shop", "server")
        .objects(STRICT_SHOP)
        .start()
        .await
        .unwrap();
    let server = echo(&cluster, "server").await;
    let side = cluster.topology().attach_side_network("server").unwrap();
    let client = InPod::open(&side.netns_path()).unwrap();
    // Where the app's own answer to a SYN would show under eBPF capture, which routes a reply
    // from the app's socket back into the pod: the handshake never completes, and the app
    // never accepts. (The agent answers for the app with the same ports, but by the interface.)
    let pod_netns = &cluster.pod("server").unwrap().netns;
    let app_answers = PacketCapture::start(
        pod_netns,
        "lo",
        &format!("tcp src port {APP_PORT} and tcp[tcpflags] & tcp-syn != 0"),
    )
    .unwrap();

    // To the pod's main address and to its address on the new interface: one attempt each (a
    // SYN that came before capture reached the interface is sent again).
    for address in [cluster.pod("server").unwrap().ip, side.pod_ip] {
        let target = SocketAddr::new(IpAddr::V4(address), APP_PORT);
        let connect = tokio::time::timeout(Duration::from_secs(5), client.connect(target)).await;
        let answered = match connect {
            Ok(Ok(mut stream)) => Some(
                tokio::time::timeout(Duration::from_secs(2), read_peer_line(&mut stream)).await,
            ),
            Ok(Err(_)) | Err(_) => None,
        };
        let dropped_as_unregistered = backend == Backend::Ebpf && address == side.pod_ip;
        let Some(greeting) = answered else {
            assert!(
                dropped_as_unregistered,
                "nothing answered a SYN to {target} that came by the new interface: it is not captured\n{}",
                cluster.logs()
            );
            continue;
        };
        assert!(
            !matches!(greeting, Ok(Ok(_))),
            "the app greeted a plaintext client at {target}: {greeting:?}"
        );
    }

    let app_answered = app_answers.caught_any().unwrap();
    assert_eq!(
        (server.accepted_from(IpAddr::V4(side.ip)), app_answered),
        (0, false),
        "plaintext by the new interface reached the app of a STRICT pod\n{}",
        cluster.logs()
    );
}

/// An agent restarted with the other backend replaces the first one's capture: each pod ends up
/// with exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_backends_leaves_one_capture() {
    let mut cluster = cluster(Backend::Nftables).await;
    let _server = echo(&cluster, "server").await;
    for (from, to) in [
        (Backend::Nftables, Backend::Ebpf),
        (Backend::Ebpf, Backend::Nftables),
    ] {
        assert_eq!(captures(from, &cluster, "server"), (1, 1));
        cluster.kill_agent("node2");
        cluster.set_agent_args(&["--redirect", to.flag()]);
        cluster.start_agent("node2").await.unwrap();
        assert_eq!(captures(to, &cluster, "server"), (1, 1));
        assert_eq!(
            captures(from, &cluster, "server"),
            (0, 0),
            "{from:?} left behind"
        );
        let peer = round_trip(&cluster, "client", "server", b"switched").await;
        assert_eq!(peer, ip(&cluster, "client"));
    }
}

/// With eBPF capture a pod's namespace holds no nftables (or iptables-nft) rule at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_capture_leaves_no_netfilter_rule() {
    let cluster = cluster(Backend::Ebpf).await;
    for pod in ["client", "local", "server"] {
        assert_eq!(captures(Backend::Ebpf, &cluster, pod), (1, 1));
        let ruleset = run_in(&cluster, pod, &["nft", "list", "ruleset"]);
        assert_eq!(ruleset, "", "{pod} has netfilter rules");
    }
}

with_each_backend!(
    cross_node_traffic_is_tunneled_and_keeps_the_client_ip,
    same_node_traffic_is_tunneled_too,
    traffic_to_and_from_pods_outside_the_mesh_still_works,
    an_opted_out_pod_is_left_alone,
    pods_are_enrolled_and_released_as_the_file_changes,
    a_dead_agent_fails_closed_and_a_new_one_resumes,
    capture_left_behind_is_removed_at_start,
    an_interface_added_later_is_captured,
);
