//! Upgrading a node's agent on the namespace mesh, with each capture backend: a new agent taking
//! over from the running one, again and again under load, refuses and resets nothing; one that
//! cannot take over stops the old one instead and says why.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_agent::lab::topology::Topology;
use ambit_agent::lab::{Cluster, EchoApp, InPod};
use ambit_integration::{Backend, agent_binary, exchange, greeted, logged, with_each_backend};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const REPLACEMENTS: usize = 5;
/// Long enough for every connection held across the replacements to finish first.
const DRAIN_TIMEOUT: &str = "60s";

/// `client` and `web` in the mesh on node1, whose agent is replaced; `server` in the mesh and
/// `outsider` outside it on node2.
async fn cluster(backend: Backend) -> Cluster {
    Cluster::builder(&agent_binary())
        .agent_args(&[
            "--redirect",
            backend.flag(),
            "--drain-timeout",
            DRAIN_TIMEOUT,
        ])
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("legacy")
        .pod("node1", "shop", "client")
        .pod("node1", "shop", "web")
        .pod("node2", "shop", "server")
        .pod("node2", "legacy", "outsider")
        .start()
        .await
        .unwrap()
}

/// Every way a connection crosses node1's agent: out of a pod through a tunnel, into a pod
/// through a tunnel, and into a pod in plaintext from outside the mesh.
const FLOWS: [(&str, &str); 3] = [("client", "server"), ("server", "web"), ("outsider", "web")];

/// Where a flow connects from and to.
fn ends(cluster: &Cluster, (from, to): (&str, &str)) -> (InPod, SocketAddr) {
    (
        cluster.in_pod(from).unwrap(),
        cluster.addr(to, APP_PORT).unwrap(),
    )
}

/// Opens a connection from `from` to the echo app of `to` and reads the app's greeting.
async fn open(cluster: &Cluster, from: &str, to: &str) -> std::io::Result<TcpStream> {
    let (from, to) = ends(cluster, (from, to));
    greeted(&from, to).await
}

/// New connections on every flow, one after the other on two loops per flow, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// By flow, in the order of [`FLOWS`].
    opened: Arc<[AtomicUsize; FLOWS.len()]>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &Cluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new([const { AtomicUsize::new(0) }; FLOWS.len()]);
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (index, flow) in FLOWS.into_iter().enumerate().flat_map(|f| [f, f]) {
            let (from, to) = ends(cluster, flow);
            let (stop, opened, failures) = (stop.clone(), opened.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let connected = async {
                        let mut stream = greeted(&from, to).await?;
                        exchange(&mut stream, b"new").await
                    };
                    match connected.await {
                        Ok(()) => opened[index].fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            failures.lock().unwrap().push(format!("{flow:?}: {error}"));
                            0
                        }
                    };
                }
            }));
        }
        Self {
            stop,
            opened,
            failures,
            tasks,
        }
    }

    /// Stops the load: how many connections it opened on each flow, and every failure.
    async fn stop(self) -> ([usize; FLOWS.len()], Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let opened = self.opened.each_ref().map(|n| n.load(Ordering::Relaxed));
        (opened, failures)
    }
}

/// One connection held on each flow.
async fn hold(cluster: &Cluster) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for (from, to) in FLOWS {
        held.push(open(cluster, from, to).await.unwrap());
    }
    held
}

/// The inode of the network namespace named `netns`.
fn netns_inode(netns: &str) -> u64 {
    std::fs::metadata(Path::new("/var/run/netns").join(netns))
        .unwrap()
        .ino()
}

/// The BPF links attached to the network namespace `netns` (sk_lookup programs), by the
/// descriptors of every process that holds one: such a link lives as long as they do.
fn netns_links(netns: &str) -> usize {
    let inode = format!("netns_ino:\t{}", netns_inode(netns));
    let mut links = HashSet::new();
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info.lines().any(|line| line == inode)
                && let Some(id) = info.lines().find_map(|line| line.strip_prefix("link_id:"))
            {
                links.insert(id.trim().to_owned());
            }
        }
    }
    links.len()
}

/// The BPF filters on `interface`'s ingress in `netns`.
fn tc_filters(netns: &str, interface: &str) -> usize {
    let output = Topology::command_in(netns, "tc")
        .args(["filter", "show", "dev", interface, "ingress"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(" bpf ") && line.contains("handle"))
        .count()
}

/// ambit's nftables tables in `netns`.
fn nft_tables(netns: &str) -> usize {
    let output = Topology::command_in(netns, "nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.trim() == "table inet ambit")
        .count()
}

/// The captures installed in each of node1's pods: (sk_lookup links, tc filters, nftables
/// tables).
fn captures(cluster: &Cluster) -> Vec<(&'static str, (usize, usize, usize))> {
    ["client", "web"]
        .into_iter()
        .map(|pod| {
            let netns = &cluster.pod(pod).unwrap().netns;
            (
                pod,
                (
                    netns_links(netns),
                    tc_filters(netns, "eth0"),
                    nft_tables(netns),
                ),
            )
        })
        .collect()
}

/// What one capture of `backend` installs in a pod.
fn one_capture(backend: Backend) -> (usize, usize, usize) {
    match backend {
        Backend::Ebpf => (1, 1, 0),
        Backend::Nftables => (0, 0, 1),
    }
}

async fn echo_apps(cluster: &Cluster) -> Vec<EchoApp> {
    let mut apps = Vec::new();
    for pod in ["server", "web"] {
        apps.push(cluster.in_pod(pod).unwrap().echo(APP_PORT).await.unwrap());
    }
    apps
}

/// node1's agent replaced five times in a row while new connections cross it without pause and
/// older ones are held: no new connection fails, no held one breaks, and in the end one agent
/// runs with one capture per pod.
async fn replacing_the_agent_drops_no_connection(backend: Backend) {
    let mut cluster = cluster(backend).await;
    let _apps = echo_apps(&cluster).await;
    // Held through every replacement, by the first agent.
    let mut long_lived = hold(&cluster).await;
    let load = Load::start(&cluster);
    let started = Instant::now();
    for replacement in 1..=REPLACEMENTS {
        let mut held = hold(&cluster).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster
            .replace_agent("node1", &[])
            .await
            .unwrap_or_else(|error| panic!("replacement {replacement}: {error:#}"));
        for (index, stream) in held.iter_mut().chain(long_lived.iter_mut()).enumerate() {
            if let Err(error) = exchange(stream, b"held").await {
                panic!(
                    "replacement {replacement}: held connection {index} broke: {error}\n{}",
                    cluster.logs()
                );
            }
        }
        // The new agent shows the old one draining what it still carries: these.
        let draining = wait_for_predecessor(&cluster, |predecessor| {
            predecessor["state"] == "taken over" && predecessor["open_sockets"].as_u64() > Some(0)
        })
        .await;
        assert!(
            draining,
            "ambit debug agent does not show the old agent draining"
        );
        drop(held);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (opened, failures) = load.stop().await;
    let elapsed = started.elapsed();
    let total: usize = opened.iter().sum();
    assert!(
        failures.is_empty(),
        "{} of {} new connections failed across {REPLACEMENTS} replacements: {failures:?}\n{}",
        failures.len(),
        total + failures.len(),
        cluster.logs()
    );
    report_load(total, elapsed);
    for stream in &mut long_lived {
        exchange(stream, b"after all").await.unwrap();
    }
    drop(long_lived);

    // Every connection the old agents carried is closed: each exits well before its deadline.
    for old in cluster.replaced_agents() {
        assert!(
            old.exited_within(Duration::from_secs(15)).await.unwrap(),
            "a replaced agent (pid {}) still runs:\n{}",
            old.pid(),
            old.log()
        );
    }
    assert_eq!(cluster.replaced_agents().len(), REPLACEMENTS);
    // Every connection went through node1's agents, none past them: each is in their access
    // logs, those of the load and the held ones (one per flow before each replacement, and
    // before the first).
    for (index, flow) in FLOWS.into_iter().enumerate() {
        let expected = opened[index] + REPLACEMENTS + 1;
        let carried = node1_access_log(&mut cluster, flow).await;
        assert_eq!(
            carried, expected,
            "{flow:?}: connections in node1's access logs"
        );
    }
    assert!(wait_for_predecessor(&cluster, |predecessor| predecessor["state"] == "exited").await);
    let expected = one_capture(backend);
    for (pod, installed) in captures(&cluster) {
        assert_eq!(
            installed, expected,
            "{pod}: (sk_lookup links, tc filters, nftables tables) after the last hand-over"
        );
    }
    let metrics = cluster.agent("node1").unwrap().metrics().await.unwrap();
    assert!(
        metrics.contains(r#"ambit_handovers_total{role="successor",outcome="taken_over"} 1"#),
        "{metrics}"
    );
}

/// The connections of `flow` in the access logs of node1's agents, the current one and those it
/// replaced, once the current one has logged as many as the others (it logs each as it closes).
async fn node1_access_log(cluster: &mut Cluster, (from, to): (&str, &str)) -> usize {
    let (from, to) = (cluster.pod(from).unwrap().ip, cluster.pod(to).unwrap().ip);
    let count = |log: &str| {
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["message"] == "connection closed")
            .filter(|line| {
                let ip = |field: &str| {
                    line[field]
                        .as_str()
                        .and_then(|addr| addr.parse::<SocketAddr>().ok())
                        .map(|addr| addr.ip())
                };
                ip("src.addr") == Some(from.into()) && ip("dst.addr") == Some(to.into())
            })
            .count()
    };
    let replaced: usize = cluster
        .replaced_agents()
        .iter()
        .map(|agent| count(&agent.log()))
        .sum();
    let current = cluster.agent("node1").unwrap();
    let mut settled = count(&current.log());
    // The current agent's last lines may still be on their way.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count(&current.log());
        if now == settled {
            break;
        }
        settled = now;
    }
    replaced + settled
}

/// Whether `ambit debug agent` on node1 shows, within 5 s, an agent it replaced as `wanted`.
async fn wait_for_predecessor(
    cluster: &Cluster,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    let agent = cluster.agent("node1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let output = agent.debug(&["agent", "-o", "json"]).unwrap();
        let view: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if wanted(&view["predecessor"]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[expect(
    clippy::print_stderr,
    reason = "the load the test ran, shown with its output"
)]
fn report_load(opened: usize, elapsed: Duration) {
    eprintln!(
        "{opened} new connections in {elapsed:?} ({:.0}/s) across {REPLACEMENTS} replacements, none failed",
        opened as f64 / elapsed.as_secs_f64(),
    );
}

with_each_backend!(replacing_the_agent_drops_no_connection);

/// A new agent with another capture backend cannot take over: it stops the running one, says
/// why, and captures the pods with its own backend, once each. (Switching backends changes
/// how the pods' packets are routed: connections the old agent carried do not survive it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_that_cannot_take_over_stops_the_old_one_and_says_why() {
    let mut cluster = cluster(Backend::Ebpf).await;
    let _apps = echo_apps(&cluster).await;
    cluster
        .replace_agent("node1", &["--redirect", "nftables"])
        .await
        .unwrap();
    let node1 = cluster.agent("node1").unwrap();
    logged(|| node1.log(), "cannot take over from the running agent").await;
    logged(
        || node1.log(),
        "this agent captures with ebpf, the new one with nftables",
    )
    .await;
    for (from, to) in FLOWS {
        let mut stream = open(&cluster, from, to).await.unwrap();
        exchange(&mut stream, b"after").await.unwrap();
    }
    let old = &mut cluster.replaced_agents()[0];
    assert!(old.exited_within(Duration::from_secs(15)).await.unwrap());
    for (pod, installed) in captures(&cluster) {
        assert_eq!(installed, one_capture(Backend::Nftables), "{pod}");
    }
}

/// A raw client of an agent's hand-over socket, as a successor (or anything else on the node)
/// would speak to it.
struct HandoverClient(std::os::fd::OwnedFd);

impl HandoverClient {
    fn connect(path: &Path) -> Self {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(path).unwrap(),
        )
        .unwrap();
        Self(fd)
    }

    fn send(&self, message: &[u8]) {
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            message,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
    }

    /// The next message, parsed, and how many descriptors came with it (closed at once).
    fn receive(&self) -> (serde_json::Value, usize) {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut buffer = vec![0; 64 * 1024];
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let mut control = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        let message = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut descriptors = 0;
        for control in message.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = control {
                descriptors += fds.len();
                for fd in fds {
                    let _ = nix::unistd::close(fd);
                }
            }
        }
        let length = message.bytes;
        (
            serde_json::from_slice(&buffer[..length]).unwrap(),
            descriptors,
        )
    }
}

/// Garbage on the hand-over socket is refused, and a successor that receives the listeners and
/// goes away without taking over leaves the agent as it was: accepting throughout, ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_goes_away_leaves_the_agent_as_it_was() {
    let cluster = cluster(Backend::Ebpf).await;
    let _apps = echo_apps(&cluster).await;
    let socket = cluster.handover_socket("node1");
    let agent = cluster.agent("node1").unwrap();
    let ready = async || {
        agent
            .get(15021, ambit_agent::READY_PATH)
            .await
            .unwrap()
            .map(|(status, _)| status)
    };

    let garbage = HandoverClient::connect(&socket);
    garbage.send(b"\xff{\"type\":\"take_everything\"");
    let (refused, descriptors) = garbage.receive();
    assert_eq!(
        (refused["type"].as_str(), descriptors),
        (Some("refused"), 0)
    );
    drop(garbage);

    let successor = HandoverClient::connect(&socket);
    successor.send(br#"{"type":"hello","protocol":1,"capture":"ebpf","pid":1}"#);
    let (offer, node_listeners) = successor.receive();
    assert_eq!(offer["type"], "offer", "{offer}");
    // Readiness, metrics, admin and the hand-over socket; no CNI socket with the file source.
    assert_eq!(node_listeners, 4);
    assert_eq!(offer["pods"], 2, "{offer}");
    for _ in 0..2 {
        let (pod, descriptors) = successor.receive();
        assert_eq!(
            (pod["type"].as_str(), descriptors),
            (Some("pod"), 6),
            "{pod}"
        );
    }
    assert_eq!(ready().await, Some(503), "ready while handing over");
    for flow in FLOWS {
        let mut stream = open(&cluster, flow.0, flow.1).await.unwrap();
        exchange(&mut stream, b"while offered").await.unwrap();
    }
    drop(successor);

    let deadline = Instant::now() + Duration::from_secs(5);
    while ready().await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "never ready again\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for flow in FLOWS {
        let mut stream = open(&cluster, flow.0, flow.1).await.unwrap();
        exchange(&mut stream, b"after").await.unwrap();
    }
    let metrics = agent.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"ambit_handovers_total{role="predecessor",outcome="failed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ambit_handovers_total{role="predecessor",outcome="refused"} 1"#),
        "{metrics}"
    );
}

/// An agent that carries nothing drains at once once taken over, and exits: it has told its
/// successor first, each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_is_replaced_and_exits_at_once() {
    let mut cluster = cluster(Backend::Nftables).await;
    for replacement in 1..=3 {
        cluster
            .replace_agent("node1", &[])
            .await
            .unwrap_or_else(|error| panic!("replacement {replacement}: {error:#}"));
    }
    for old in cluster.replaced_agents() {
        assert!(old.exited_within(Duration::from_secs(5)).await.unwrap());
    }
    let _apps = echo_apps(&cluster).await;
    for (from, to) in FLOWS {
        let mut stream = open(&cluster, from, to).await.unwrap();
        exchange(&mut stream, b"after").await.unwrap();
    }
}
