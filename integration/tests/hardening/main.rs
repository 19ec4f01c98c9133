//! Failing closed and staying up under hostile input, on the namespace mesh, with each capture
//! backend: a relabelled pod never opens to plaintext, a flood of idle connections to 15008
//! does not take the node down, SIGTERM drains instead of dropping, and a SYN split into IPv4
//! fragments does not slip past capture.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

mod fragments;

use fragments::Syn;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_agent::READY_PATH;
use ambit_agent::lab::topology::Topology;
use ambit_agent::lab::{Cluster, EchoApp, read_peer_line};
use ambit_integration::{
    Backend, PacketCapture, STRICT_SHOP, agent_binary, assert_closed, assert_cut_off_is_reset,
    exchange, greeted, serve_cut_off, with_each_backend,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
const READINESS_PORT: u16 = 15021;
/// Where kubelet's probes come from, as nodes SNAT them.
const KUBELET_PROBE_SOURCE: [u8; 4] = [169, 254, 7, 127];
/// `client` on node1; `server` and `neighbour` on node2, all in the mesh under STRICT;
/// `outsider` outside the mesh on node2 and `db` outside it on node1.
async fn cluster(backend: Backend, args: &[&str]) -> Cluster {
    Cluster::builder(&agent_binary())
        .agent_args(&["--redirect", backend.flag()])
        .agent_args(args)
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("legacy")
        .pod("node1", "shop", "client")
        .pod("node2", "shop", "server")
        .pod("node2", "shop", "neighbour")
        .pod("node2", "legacy", "outsider")
        .pod("node1", "legacy", "db")
        .objects(STRICT_SHOP)
        .start()
        .await
        .unwrap()
}

async fn echo(cluster: &Cluster, pod: &str) -> EchoApp {
    cluster.in_pod(pod).unwrap().echo(APP_PORT).await.unwrap()
}

fn ip(cluster: &Cluster, pod: &str) -> IpAddr {
    IpAddr::V4(cluster.pod(pod).unwrap().ip)
}

/// Opens a connection from `from` to the app of `to` and reads the app's greeting.
async fn open(cluster: &Cluster, from: &str, to: &str) -> std::io::Result<TcpStream> {
    let to = cluster.addr(to, APP_PORT).unwrap();
    greeted(&cluster.in_pod(from).unwrap(), to).await
}

async fn round_trip(cluster: &Cluster, from: &str, to: &str) -> std::io::Result<()> {
    exchange(&mut open(cluster, from, to).await?, b"hello").await
}

/// The value of the series `series` (name and labels, as exported) in `metrics`.
fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Relabelling a pod over and over while an outsider hammers its app port: not one plaintext
/// connection reaches the app, and tunneled traffic to it never fails.
async fn relabelling_a_pod_never_opens_it(backend: Backend) {
    let mut cluster = cluster(backend, &[]).await;
    let server = echo(&cluster, "server").await;
    let target = cluster.addr("server", APP_PORT).unwrap();
    let hammer = Hammer::start(&cluster, "outsider", vec![target]);

    let mut tunneled = 0;
    for edit in 0..10 {
        cluster.set_pod_label("server", "edit", &edit.to_string());
        cluster.apply().await.unwrap();
        for _ in 0..3 {
            if let Err(error) = round_trip(&cluster, "client", "server").await {
                panic!(
                    "tunneled traffic failed after edit {edit}: {error}\n{}",
                    cluster.logs()
                );
            }
            tunneled += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(hammer.stop().await > 10, "the outsider barely tried");
    assert_eq!(
        server.accepted_from(ip(&cluster, "outsider")),
        0,
        "plaintext reached the app of a STRICT pod while it was relabelled\n{}",
        cluster.logs()
    );
    assert_eq!(server.accepted_from(ip(&cluster, "client")), tunneled);
}

/// Plaintext connections from one pod to a list of addresses, over and over, each waiting
/// briefly to be accepted (20 ms: a SYN that is dropped is not waited for long) and for the
/// app's greeting, until stopped.
struct Hammer {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Hammer {
    fn start(cluster: &Cluster, from: &str, targets: Vec<SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let client = cluster.in_pod(from).unwrap();
        let task = tokio::spawn({
            let (stop, attempts) = (stop.clone(), Arc::clone(&attempts));
            async move {
                for target in targets.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let connect = client.connect(*target);
                    if let Ok(Ok(mut stream)) =
                        tokio::time::timeout(Duration::from_millis(20), connect).await
                    {
                        let greeting = read_peer_line(&mut stream);
                        let _ = tokio::time::timeout(Duration::from_millis(200), greeting).await;
                    }
                }
            }
        });
        Self {
            stop,
            attempts,
            task,
        }
    }

    /// Stops and tells how many connections it tried.
    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.attempts.load(Ordering::Relaxed)
    }
}

/// A pod given a new address in the same network namespace: its old proxies hold the pod's
/// ports, so they stop before the new ones start, and capture without them fails closed. An
/// outsider hammering both addresses meanwhile reaches the app at neither; tunneled traffic
/// reaches it at the new one afterwards.
async fn a_new_address_in_the_same_namespace_never_opens_the_pod(backend: Backend) {
    let mut cluster = cluster(backend, &[]).await;
    let server = echo(&cluster, "server").await;
    let old = cluster.addr("server", APP_PORT).unwrap();
    let new = SocketAddr::new(
        IpAddr::V4(cluster.readdress_pod("server").unwrap()),
        APP_PORT,
    );
    let hammer = Hammer::start(&cluster, "outsider", vec![old, new]);

    cluster.apply().await.unwrap();
    let moved = wait_for(Duration::from_secs(15), async || {
        round_trip(&cluster, "client", "server").await.is_ok()
    })
    .await;
    assert!(moved, "never captured at {new}\n{}", cluster.logs());
    round_trip(&cluster, "client", "server").await.unwrap();
    assert!(hammer.stop().await > 10, "the outsider barely tried");
    assert_eq!(
        server.accepted_from(ip(&cluster, "outsider")),
        0,
        "plaintext reached the app of a STRICT pod while it moved\n{}",
        cluster.logs()
    );
}

/// As many idle connections to one pod's 15008 as this process can open: the agent holds at
/// most its per-source share of them, each for the handshake timeout, and every other pod of
/// the node keeps working meanwhile.
async fn idle_connections_to_hbone_do_not_take_the_node_down(backend: Backend) {
    let cluster = cluster(backend, &["--handshake-timeout", "2s"]).await;
    let (_server, _neighbour, _db) = (
        echo(&cluster, "server").await,
        echo(&cluster, "neighbour").await,
        echo(&cluster, "db").await,
    );
    let agent_pid = cluster.agent("node2").unwrap().pid();
    let descriptors_before = open_descriptors(agent_pid);

    let target = cluster.addr("server", HBONE_PORT).unwrap();
    let idle = cluster
        .in_pod("outsider")
        .unwrap()
        .run(move || open_idle_connections(target))
        .await
        .unwrap();
    assert!(
        idle.len() > 10_000,
        "only {} connections opened",
        idle.len()
    );

    // Every pod of the node, the attacked one included, still talks both ways.
    for (from, to) in [
        ("client", "server"),
        ("client", "neighbour"),
        ("neighbour", "db"),
        ("server", "db"),
    ] {
        if let Err(error) = round_trip(&cluster, from, to).await {
            panic!(
                "{from} -> {to} failed under the flood: {error}\n{}",
                cluster.logs()
            );
        }
    }

    // Past the handshake timeout, the agent holds none of them.
    let agent = cluster.agent("node2").unwrap();
    let settled = wait_for(Duration::from_secs(10), async || {
        let metrics = agent.metrics().await.unwrap();
        metric(&metrics, "ambit_pending_connections ") == Some(0.0)
            && open_descriptors(agent_pid) < descriptors_before + 50
    })
    .await;
    let metrics = agent.metrics().await.unwrap();
    assert!(
        settled,
        "the agent still holds idle connections: {} descriptors (was {descriptors_before})\n{metrics}",
        open_descriptors(agent_pid)
    );
    let refused = metric(
        &metrics,
        r#"ambit_connections_refused_total{listener="hbone",reason="source_limit"} "#,
    );
    assert!(refused.unwrap_or(0.0) > 0.0, "{metrics}");
    let timed_out = metric(
        &metrics,
        r#"ambit_handshake_failures_total{reason="timeout"} "#,
    );
    assert!(timed_out.unwrap_or(0.0) > 0.0, "{metrics}");
    // The flood's allocations on every worker left one allocator thread purging them.
    let purging = threads_named(agent_pid, "jemalloc_bg_thd");
    assert!(purging <= 1, "{purging} allocator threads");
    drop(idle);
}

fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|comm| comm.trim_end() == name)
        })
        .count()
}

/// Connects to `target` until this process runs out of descriptors (or 19,000 connections),
/// never sending a byte.
fn open_idle_connections(target: SocketAddr) -> Vec<std::net::TcpStream> {
    let mut idle = Vec::new();
    let started = Instant::now();
    while idle.len() < 19_000 && started.elapsed() < Duration::from_secs(60) {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(stream) => idle.push(stream),
            Err(error) if error.raw_os_error() == Some(nix::libc::EMFILE) => break,
            Err(_) => {}
        }
    }
    idle
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

async fn wait_for(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An app that connects to the agent's outbound listener itself, on loopback (capture steers
/// no loopback destination there): the connection is closed, not relayed to that same
/// listener over and over.
async fn the_outbound_listener_reached_directly_relays_nothing(backend: Backend) {
    let cluster = cluster(backend, &[]).await;
    let agent_pid = cluster.agent("node1").unwrap().pid();
    let descriptors_before = open_descriptors(agent_pid);
    let client = cluster.in_pod("client").unwrap();
    let mut tcp = client
        .connect(([127, 0, 0, 1], 15001).into())
        .await
        .unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_closed(&cluster, tcp).await;
    assert!(open_descriptors(agent_pid) < descriptors_before + 10);
    // The pod's own traffic is unaffected.
    let _server = echo(&cluster, "server").await;
    round_trip(&cluster, "client", "server").await.unwrap();
}

/// An app that resets its connection mid-answer: the client's connection through the mesh is
/// reset too, not closed as if the answer were complete.
async fn a_reset_by_the_app_reaches_the_client(backend: Backend) {
    let cluster = cluster(backend, &[]).await;
    let server = cluster.in_pod("server").unwrap();
    tokio::spawn(serve_cut_off(server.listen(APP_PORT).await.unwrap()));
    let to = cluster.addr("server", APP_PORT).unwrap();
    assert_cut_off_is_reset(&cluster.in_pod("client").unwrap(), to).await;
}

/// SIGTERM to the agent of either end: readiness turns off at once, the held connection keeps
/// flowing until the drain timeout, new connections fail closed, and the agent then exits.
async fn a_held_connection_survives_sigterm_until_the_drain_deadline(backend: Backend) {
    for node in ["node1", "node2"] {
        let drain_timeout = Duration::from_secs(4);
        let mut cluster = cluster(backend, &["--drain-timeout", "4s"]).await;
        let server = echo(&cluster, "server").await;
        let mut held = open(&cluster, "client", "server").await.unwrap();
        exchange(&mut held, b"before").await.unwrap();
        let accepted = server.accepted();

        let agent = cluster.agent(node).unwrap();
        agent.terminate().unwrap();
        let terminated = Instant::now();
        let unready = wait_for(Duration::from_secs(1), async || {
            let status = agent.get(READINESS_PORT, READY_PATH).await.unwrap();
            status.is_some_and(|(status, _)| status == 503)
        })
        .await;
        assert!(unready, "{node}: still ready while draining");

        for during in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(error) = exchange(&mut held, b"during the drain").await {
                panic!(
                    "{node}: the held connection broke {during}: {error}\n{}",
                    cluster.logs()
                );
            }
        }
        assert!(
            open(&cluster, "client", "server").await.is_err(),
            "{node}: a new connection got through a draining agent"
        );
        assert_eq!(server.accepted(), accepted);

        let agent = cluster.agent_mut(node).unwrap();
        assert!(
            agent.exited_within(drain_timeout * 2).await.unwrap(),
            "{node}: the agent outlived its drain timeout"
        );
        let exited = terminated.elapsed();
        assert!(
            exited >= drain_timeout - Duration::from_millis(500),
            "{node}: the agent exited after {exited:?}, before its drain timeout"
        );
        assert!(
            exchange(&mut held, b"after").await.is_err(),
            "{node}: the connection outlived its agent"
        );
        assert!(open(&cluster, "client", "server").await.is_err());
        assert_eq!(server.accepted(), accepted);
    }
}

/// A second SIGTERM ends the drain at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain() {
    let mut cluster = cluster(Backend::Ebpf, &["--drain-timeout", "60s"]).await;
    let _server = echo(&cluster, "server").await;
    let mut held = open(&cluster, "client", "server").await.unwrap();
    let agent = cluster.agent_mut("node2").unwrap();
    agent.terminate().unwrap();
    assert!(!agent.exited_within(Duration::from_secs(1)).await.unwrap());
    exchange(&mut held, b"still draining").await.unwrap();
    agent.terminate().unwrap();
    assert!(agent.exited_within(Duration::from_secs(2)).await.unwrap());
}

/// A SYN in two IPv4 fragments, the TCP flags in the second, to a STRICT pod's app: it never
/// reaches the app. The same fragments reach an app outside the mesh, so the test could fail.
async fn a_syn_in_fragments_never_reaches_the_app(backend: Backend) {
    let cluster = cluster(backend, &[]).await;
    let (server, db) = (echo(&cluster, "server").await, echo(&cluster, "db").await);
    let outsider = cluster.in_pod("outsider").unwrap();
    let from = ip(&cluster, "outsider");
    fragments::drop_resets(&cluster.pod("outsider").unwrap().netns);

    for (to, app, reachable) in [("db", &db, true), ("server", &server, false)] {
        let target = cluster.addr(to, APP_PORT).unwrap();
        // Where the app's own answer to a SYN would show: under eBPF capture a reply from the
        // app's socket is routed back into the pod, under nftables it leaves by eth0 and
        // completes the handshake.
        let app_answers = PacketCapture::start(
            &cluster.pod(to).unwrap().netns,
            "lo",
            &format!("tcp src port {APP_PORT} and tcp[tcpflags] & tcp-syn != 0"),
        )
        .unwrap();
        let handshake = outsider
            .run(move || fragments::connect(from, target, Syn::InFragments))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answered_on_loopback = app_answers.caught_any().unwrap();
        let accepted = app.accepted_from(from);
        if reachable {
            assert_eq!(
                (handshake.unwrap(), accepted),
                (true, 1),
                "the fragmented SYN did not reach an app outside the mesh"
            );
        } else {
            assert_eq!(
                (accepted, answered_on_loopback),
                (0, false),
                "a fragmented SYN reached a STRICT pod's app ({handshake:?})\n{}",
                cluster.logs()
            );
        }
    }
}

/// With SYN cookies, an ACK carries the whole handshake: one that answers the agent's SYN-ACK
/// reaches no socket of the agent's, and must not be taken by the app's listener instead (the
/// cookie is valid for any listener of the pod). The pod is made to always send cookies, as a
/// SYN flood would.
async fn a_syn_cookie_answer_never_reaches_the_app(backend: Backend) {
    let cluster = cluster(backend, &[]).await;
    let server = echo(&cluster, "server").await;
    let server_netns = &cluster.pod("server").unwrap().netns;
    let sysctl = Topology::command_in(server_netns, "sysctl")
        .args(["-qw", "net.ipv4.tcp_syncookies=2"])
        .status()
        .unwrap();
    assert!(sysctl.success());
    fragments::drop_resets(&cluster.pod("outsider").unwrap().netns);

    let from = ip(&cluster, "outsider");
    let target = cluster.addr("server", APP_PORT).unwrap();
    let outsider = cluster.in_pod("outsider").unwrap();
    // A SYN as from kubelet, which capture lets through to the app: its listener now answers
    // with a cookie too, and so takes cookies (a listener that sent none refuses them).
    let kubelet = IpAddr::from(KUBELET_PROBE_SOURCE);
    let _ = outsider
        .run(move || fragments::connect(kubelet, target, Syn::Whole))
        .await
        .unwrap();
    let handshake = outsider
        .run(move || fragments::connect(from, target, Syn::Whole))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(handshake.unwrap(), "the SYN was not answered");
    assert_eq!(
        server.accepted_from(from),
        0,
        "a SYN cookie took a plaintext client past the agent to a STRICT pod's app\n{}",
        cluster.logs()
    );
}

with_each_backend!(
    relabelling_a_pod_never_opens_it,
    the_outbound_listener_reached_directly_relays_nothing,
    a_reset_by_the_app_reaches_the_client,
    idle_connections_to_hbone_do_not_take_the_node_down,
    a_held_connection_survives_sigterm_until_the_drain_deadline,
    a_syn_in_fragments_never_reaches_the_app,
    a_syn_cookie_answer_never_reaches_the_app,
    a_new_address_in_the_same_namespace_never_opens_the_pod,
);
