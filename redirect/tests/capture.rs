//! Enabling capture in a pod that has it already, as an agent taking over from another does for
//! every pod, on real namespaces (needs root): the pod's policy routing is left alone, no rule
//! removed and added back, so its traffic is steered throughout.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot set up or watch the pod fails the test"
)]

mod common;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ambit_redirect::{
    CaptureBackend, CaptureTarget, DNS_PORT, Ebpf, HBONE_PORT, INBOUND_PLAINTEXT_PORT, NetSysctls,
    Netns, Nftables, OUTBOUND_PORT, socket,
};
use common::{Namespaces, require_root, run, veth};

/// The agent's sockets in the calling thread's namespace, for a pod at `ip`.
fn listeners(ip: IpAddr) -> std::io::Result<CaptureTarget> {
    let listener = |port| socket::listener(socket::any(ip, port), true).map(OwnedFd::from);
    let (dns_udp, dns_tcp) = socket::dns_sockets(DNS_PORT)?;
    Ok(CaptureTarget {
        pod_ip: ip,
        outbound: listener(OUTBOUND_PORT)?,
        inbound_plaintext: listener(INBOUND_PLAINTEXT_PORT)?,
        hbone: listener(HBONE_PORT)?,
        dns_udp: dns_udp.into(),
        dns_tcp: dns_tcp.into(),
    })
}

/// The policy routing changes (`ip monitor rule`) in `netns` while `change` runs.
fn rule_changes(netns: &str, change: impl FnOnce()) -> String {
    let mut monitor = Command::new("ip")
        .args(["-n", netns, "-o", "monitor", "rule"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    change();
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let mut seen = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    let _ = monitor.wait();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_capture_again_leaves_the_routing_rules_alone() {
    require_root();
    let pid = std::process::id();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 252, (pid % 250) as u8, 2));
    let sysctls = NetSysctls::new("/proc/sys/net");
    let backends: [Box<dyn CaptureBackend>; 2] = [
        Box::new(Nftables::new(sysctls.clone())),
        Box::new(Ebpf::new(sysctls).unwrap()),
    ];
    for backend in backends {
        // Capture changes run on blocking threads of the runtime, as the agent runs them.
        tokio::task::spawn_blocking(move || enable_twice(backend.as_ref(), pid, ip))
            .await
            .unwrap();
    }
}

/// Enables `backend` in a new pod namespace, then again while watching the pod's rules.
fn enable_twice(backend: &dyn CaptureBackend, pid: u32, ip: IpAddr) {
    let mut namespaces = Namespaces(Vec::new());
    let pod = namespaces
        .add(format!("ambit-test-{pid}-{}", backend.name()))
        .to_owned();
    let peer = namespaces
        .add(format!("ambit-test-{pid}-{}-peer", backend.name()))
        .to_owned();
    veth(&pod, &peer, &format!("{ip}/24"));
    run(&["-n", &pod, "link", "set", "eth0", "up"]);
    run(&["-n", &pod, "link", "set", "lo", "up"]);
    let netns = Netns::open(&Path::new("/var/run/netns").join(&pod)).unwrap();
    let target = netns.run_in(|| listeners(ip)).unwrap().unwrap();
    let enable = || netns.run_in(|| backend.enable(&target)).unwrap().unwrap();

    enable();
    let changes = rule_changes(&pod, enable);
    assert_eq!(
        changes,
        "",
        "{}: enabling again changed rules",
        backend.name()
    );
    netns.run_in(|| backend.disable()).unwrap().unwrap();
}
