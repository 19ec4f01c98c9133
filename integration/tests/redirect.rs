//! Choosing the capture backend: `--redirect ebpf` where eBPF cannot run is refused with what is
//! missing; `--redirect auto` falls back to nftables and says why. And where eBPF capture writes
//! pods' sysctls: through the procfs `sys/net` it is given, which must be writable.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot run the agent fails the test"
)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ambit_agent::lab::topology::Topology;
use ambit_integration::agent_binary;
use ambit_redirect::{
    CaptureBackend, CaptureTarget, DNS_PORT, Ebpf, HBONE_PORT, INBOUND_PLAINTEXT_PORT, NetSysctls,
    Netns, OUTBOUND_PORT, PodNetns, socket,
};

/// `ambit agent` as the unprivileged user `nobody`, without any capability, on ports of its own.
fn unprivileged_agent(dir: &Path, redirect: &str) -> Command {
    let config = dir.join("cluster.yaml");
    std::fs::write(
        &config,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    )
    .unwrap();
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(agent_binary())
        .args(["agent", "--node", "node1", "--redirect", redirect])
        .args([
            "--readiness-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--handover-socket")
        .arg(dir.join("handover.sock"));
    command
}

fn scratch_dir() -> tempfile::TempDir {
    assert!(
        nix::unistd::geteuid().is_root(),
        "dropping privileges needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

#[test]
fn ebpf_without_privileges_is_refused_saying_what_is_missing() {
    let dir = scratch_dir();
    let output = unprivileged_agent(dir.path(), "ebpf").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--redirect ebpf"), "{stderr}");
    assert!(stderr.contains("CAP_BPF and CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn auto_falls_back_to_nftables_and_says_why() {
    let dir = scratch_dir();
    let mut agent = unprivileged_agent(dir.path(), "auto")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(agent.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let started = line.contains("agent started");
        seen.push(line);
        if started {
            break;
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let log = seen.join("\n");
    assert!(
        log.contains("eBPF capture unavailable; capturing with nftables"),
        "{log}"
    );
    assert!(log.contains("CAP_BPF"), "the reason is given: {log}");
    assert!(
        seen.last()
            .is_some_and(|l| l.contains("capture=\"nftables\"")),
        "{log}"
    );
}

/// `/proc/sys/net` bind-mounted on a directory of its own, as the DaemonSet mounts the host's at
/// `/host/proc/sys/net`; unmounted when dropped.
struct SysctlMount(tempfile::TempDir);

impl SysctlMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        mount(&["--bind", "/proc/sys/net"], dir.path());
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// As container runtimes mount `/proc/sys` in unprivileged containers.
    fn make_read_only(&self) {
        mount(&["-o", "remount,bind,ro"], self.path());
    }

    fn make_writable(&self) {
        mount(&["-o", "remount,bind,rw"], self.path());
    }
}

impl Drop for SysctlMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.path())
            .status();
    }
}

fn mount(options: &[&str], dir: &Path) {
    let status = Command::new("mount")
        .args(options)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount {options:?} {}", dir.display());
}

/// The agent's three listeners and DNS sockets, opened in the calling thread's namespace.
fn listeners(ip: Ipv4Addr) -> CaptureTarget {
    let listen = |port| {
        socket::listener(socket::any(IpAddr::V4(ip), port), false)
            .unwrap()
            .into()
    };
    let (dns_udp, dns_tcp) = socket::dns_sockets(DNS_PORT).unwrap();
    CaptureTarget {
        pod_ip: IpAddr::V4(ip),
        outbound: listen(OUTBOUND_PORT),
        inbound_plaintext: listen(INBOUND_PLAINTEXT_PORT),
        hbone: listen(HBONE_PORT),
        dns_udp: dns_udp.into(),
        dns_tcp: dns_tcp.into(),
    }
}

/// A pod's `accept_local` on eth0, read through the agent's own `/proc`.
async fn accept_local(pod: &PodNetns) -> String {
    pod.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/accept_local"))
        .await
        .unwrap()
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_writes_pod_sysctls_through_the_directory_it_is_given() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces, mounts and eBPF programs: run it as root (CI does)"
    );
    let mut topology = Topology::new().unwrap();
    topology.add_node("node1").unwrap();
    let pod_ns = topology.add_pod("node1", "shop", "a").unwrap();
    let pod = PodNetns::enter(Netns::open(&pod_ns.netns_path()).unwrap()).unwrap();
    let mount = SysctlMount::new();
    let ebpf = Arc::new(Ebpf::new(NetSysctls::new(mount.path())).unwrap());
    let ip = pod_ns.ip;

    // Another mount of procfs reaches the pod's sysctls, not the agent's.
    let capture = ebpf.clone();
    pod.run(move || capture.enable(&listeners(ip)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accept_local(&pod).await, "1");

    mount.make_read_only();
    let refused = Ebpf::new(NetSysctls::new(mount.path()))
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&mount.path().display().to_string()) && refused.contains("read-only"),
        "{refused}"
    );
    let capture = ebpf.clone();
    let failed = pod
        .run(move || capture.enable(&listeners(ip)))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    let file = mount.path().join("ipv4/conf/eth0/accept_local");
    assert!(
        failed.contains(&file.display().to_string()) && failed.contains("mounted read-only?"),
        "{failed}"
    );

    mount.make_writable();
    let capture = ebpf.clone();
    pod.run(move || capture.disable()).await.unwrap().unwrap();
    assert_eq!(accept_local(&pod).await, "0");
}
