//! Privileged end-to-end tests and benchmarks of ambit on real network namespaces, built with
//! `ambit_agent::lab`: nodes and pods as namespaces joined by veth pairs, agents as child
//! processes, apps as sockets inside the pods.
//!
//! Everything needs root; without it the tests fail with a message saying so, never passing
//! silently. The exceptions are the fake Kubernetes API server (`fake-apiserver`), a test double
//! the agent's Kubernetes source runs against, and `ambit ca` run against it as a child process
//! ([`CaHarness`], [`CaProcess`]).

mod ca_harness;
pub mod dns;
mod fake_apiserver;
mod prometheus;
mod service_yaml;

pub use ca_harness::{ApiServerProcess, CaHarness, CaProcess, TestCa};
pub use fake_apiserver::{
    FakeApiServer, FakeApiServerConfig, FakeApiServerError, KubeconfigError, ObjectsFileError,
    TlsError, tls_dir,
};
pub use prometheus::{Prometheus, Sample};
pub use service_yaml::ServiceYaml;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use ambit_agent::lab::topology::{PodNs, Topology};
use ambit_agent::lab::{Cluster, ClusterBuilder, InPod, read_peer_line};
use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The `ambit` binary built next to the running test or benchmark (`AMBIT_BIN` overrides it).
/// Cargo builds it with the workspace's tests; on its own, `cargo build -p ambit-agent`.
pub fn agent_binary() -> PathBuf {
    built_binary("ambit", "AMBIT_BIN")
}

/// The `ambit-cni` plugin built next to the running test (`AMBIT_CNI_BIN` overrides it).
/// Cargo builds it with the workspace's tests; on its own, `cargo build -p ambit-cni`.
pub fn cni_binary() -> PathBuf {
    built_binary("ambit-cni", "AMBIT_CNI_BIN")
}

/// The `fake-apiserver` built next to the running test or benchmark
/// (`AMBIT_FAKE_APISERVER_BIN` overrides it). Cargo builds it with this crate's tests and
/// benches.
pub fn fake_apiserver_binary() -> PathBuf {
    built_binary("fake-apiserver", "AMBIT_FAKE_APISERVER_BIN")
}

/// `name` in the profile directory of the running executable, unless `override_variable` names
/// another path.
fn built_binary(name: &str, override_variable: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_variable) {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = match exe.parent() {
        Some(deps) if deps.ends_with("deps") => deps.parent().unwrap_or(deps),
        Some(dir) => dir,
        None => exe.as_path(),
    };
    profile_dir.join(name)
}

/// Whether the agent's HBONE listener (15008) is open in `pod`: the pod is enrolled.
pub fn agent_listens_in(pod: &PodNs) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "ss", "-Hltn"])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains(":15008"))
}

/// Two teams on two nodes: `client` (namespace `shop`) and `admin` (`ops`) in the mesh on node1,
/// `server` (`shop`) in the mesh on node2, and `outsider` (`legacy`, outside the mesh) on node2.
pub fn two_teams() -> ClusterBuilder {
    Cluster::builder(&agent_binary())
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .ambient_namespace("ops")
        .namespace("legacy")
        .pod("node1", "shop", "client")
        .pod("node1", "ops", "admin")
        .pod("node2", "shop", "server")
        .pod("node2", "legacy", "outsider")
}

/// In [`two_teams`]: only `client` may connect to `server`.
pub const ALLOW_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
";

/// PeerAuthentication STRICT for the namespace `shop`: plaintext into its pods is refused.
pub const STRICT_SHOP: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

/// A capture backend, as `--redirect` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Ebpf,
    Nftables,
}

impl Backend {
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Nftables => "nftables",
        }
    }
}

/// Runs each listed test, an `async fn(Backend)` of the calling module, once with each
/// backend: as `ebpf::<test>` and `nftables::<test>`.
#[macro_export]
macro_rules! with_each_backend {
    ($($test:ident),* $(,)?) => {
        mod ebpf {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::Backend::Ebpf).await;
                }
            )*
        }
        mod nftables {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::Backend::Nftables).await;
                }
            )*
        }
    };
}

/// tcpdump on `interface` in `netns`, writing what `filter` selects to a file until stopped.
#[derive(Debug)]
pub struct PacketCapture {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl PacketCapture {
    /// Starts tcpdump and waits until it captures.
    pub fn start(netns: &str, interface: &str, filter: &str) -> anyhow::Result<Self> {
        let file = tempfile::NamedTempFile::new().context("a temporary file for the capture")?;
        let mut child = Topology::command_in(netns, "tcpdump")
            .args([
                "-i",
                interface,
                "--immediate-mode",
                "-U",
                "-n",
                "-Z",
                "root",
                "-w",
            ])
            .arg(file.path())
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        // tcpdump says so on stderr once it captures.
        let stderr = BufReader::new(child.stderr.take().context("tcpdump's stderr")?);
        let listening = stderr
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("listening on"));
        anyhow::ensure!(listening, "tcpdump did not start");
        Ok(Self { child, file })
    }

    /// Stops the capture and tells whether it caught any packet.
    pub fn caught_any(self) -> anyhow::Result<bool> {
        /// A pcap file that holds no packet is its header alone.
        const PCAP_HEADER: usize = 24;
        Ok(self.stop()?.len() > PCAP_HEADER)
    }

    /// Stops the capture and returns the packets' bytes (pcap).
    pub fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(200));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        std::fs::read(self.file.path()).context("reading tcpdump's capture")
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 10 s) until `log` holds `line`: a connection is logged once it has closed, by a
/// thread of the agent's own.
pub async fn logged(log: impl Fn() -> String, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !log().contains(line) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never logged {line}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection from the pod `from` to the echo app at `to`, once the app's greeting (the
/// address it sees the client at) is read; within 5 s.
pub async fn greeted(from: &InPod, to: SocketAddr) -> std::io::Result<TcpStream> {
    let connect = async {
        let mut stream = from.connect(to).await?;
        read_peer_line(&mut stream).await?;
        Ok(stream)
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Sends `payload` on an open connection to an echo app and reads it back, within 5 s; an echo
/// that differs fails the test.
pub async fn exchange(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let round_trip = async {
        stream.write_all(payload).await?;
        let mut echoed = vec![0; payload.len()];
        stream.read_exact(&mut echoed).await?;
        assert_eq!(echoed, payload, "the echo differs");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), round_trip)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Fails unless `open` is closed (an end of stream or an error) within five seconds.
pub async fn assert_closed(cluster: &Cluster, mut open: TcpStream) {
    let mut buf = [0; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the connection stayed open: {closed:?}\n{}",
        cluster.logs()
    );
}

/// What an app of [`serve_cut_off`] sends before it resets the connection, as an app that
/// crashed mid-answer would.
pub const CUT_OFF_REPLY: &[u8] = b"the first half of an answer";

/// An app on `listener` that answers every connection with [`CUT_OFF_REPLY`] and then resets it.
pub async fn serve_cut_off(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        let _ = tcp.write_all(CUT_OFF_REPLY).await;
        let reset = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::Linger, &reset);
    }
}

/// Connects from `from` to an app of [`serve_cut_off`] at `to` and reads until the connection
/// ends; within 5 s. The app resets the connection, and so must the mesh: an end of stream
/// would pass the cut-off answer for a complete one. What was read before the reset is a
/// prefix of the answer (a reset may overtake data still in flight).
pub async fn assert_cut_off_is_reset(from: &InPod, to: SocketAddr) {
    let mut read = Vec::new();
    let ended = async {
        let mut tcp = from.connect(to).await?;
        tcp.read_to_end(&mut read).await
    };
    let ended = tokio::time::timeout(Duration::from_secs(5), ended).await;
    assert!(
        matches!(&ended, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection ended with {ended:?} after {:?}",
        String::from_utf8_lossy(&read)
    );
    assert!(CUT_OFF_REPLY.starts_with(&read), "{read:?}");
}
