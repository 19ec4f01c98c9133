//! Finding a pod's network namespace through its processes, on real namespaces (needs root):
//! first with a made-up `/proc` whose processes point at the lab's namespaces, then with the
//! lab's kubelet-style pod processes in the machine's own `/proc`, from a topology and from a
//! cluster.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot build the namespaces fails the test"
)]

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use ambit_agent::lab::topology::{PodNs, Topology};
use ambit_agent::lab::{CgroupLayout, Cluster};
use ambit_integration::agent_binary;
use ambit_redirect::{HostProc, Netns, NetnsId, PodNetnsError};

const CONTAINER: &str = "4f7a1c9e2b8d6f3a5c0e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a";

/// A node with the pods `a` and `b`.
fn two_pods() -> (Topology, PodNs, PodNs) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and cgroups: run it as root (CI does)"
    );
    let mut topology = Topology::new().unwrap();
    topology.add_node("node1").unwrap();
    let a = topology.add_pod("node1", "shop", "a").unwrap();
    let b = topology.add_pod("node1", "shop", "b").unwrap();
    (topology, a, b)
}

fn ip(pod: &PodNs) -> IpAddr {
    IpAddr::V4(pod.ip)
}

fn id(pod: &PodNs) -> NetnsId {
    Netns::open(&pod.netns_path()).unwrap().id()
}

/// A `/proc` of made-up processes, each with a cgroup file and a link to a real namespace.
struct FakeProc(tempfile::TempDir);

impl FakeProc {
    fn new() -> Self {
        let proc = Self(tempfile::tempdir().unwrap());
        // What a real /proc has besides processes, and a process that ended while listed.
        std::fs::create_dir_all(proc.0.path().join("sys/net")).unwrap();
        std::os::unix::fs::symlink("1", proc.0.path().join("self")).unwrap();
        std::fs::create_dir(proc.0.path().join("99")).unwrap();
        proc
    }

    fn process(&self, pid: u32, cgroup: &str, netns: &Path) {
        let dir = self.0.path().join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        std::os::unix::fs::symlink(netns, dir.join("ns/net")).unwrap();
    }

    fn find(&self, pod: &PodNs, ips: &[IpAddr]) -> Result<Netns, PodNetnsError> {
        HostProc::new(self.0.path()).find_pod_netns(&pod.uid, ips)
    }
}

/// `/proc/<pid>/cgroup` of a container of `pod` on a pure cgroup2 node with the systemd driver.
fn systemd_cgroup(pod: &PodNs) -> String {
    let uid = pod.uid.replace('-', "_");
    format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{CONTAINER}.scope\n"
    )
}

/// The same on a hybrid node with the cgroupfs driver, seen from a cgroup namespace.
fn cgroupfs_cgroup(pod: &PodNs) -> String {
    let path = format!("/../../kubepods/burstable/pod{}/{CONTAINER}", pod.uid);
    format!("12:pids:{path}\n4:memory:{path}\n1:name=systemd:{path}\n0::{path}\n")
}

#[test]
fn the_namespace_of_the_pods_processes_is_found_and_confirmed_by_its_address() {
    let (_topology, a, b) = two_pods();
    let proc = FakeProc::new();
    proc.process(10, &systemd_cgroup(&a), &a.netns_path());
    proc.process(11, &cgroupfs_cgroup(&a), &a.netns_path());
    proc.process(20, &systemd_cgroup(&b), &b.netns_path());

    assert_eq!(proc.find(&a, &[ip(&a)]).unwrap().id(), id(&a));
    assert_eq!(proc.find(&b, &[ip(&b)]).unwrap().id(), id(&b));

    // One pass over the processes finds both, as an enrolment pass does.
    let scan = HostProc::new(proc.0.path()).scan().unwrap();
    assert_eq!(scan.find_pod_netns(&a.uid, &[ip(&a)]).unwrap().id(), id(&a));
    assert_eq!(scan.find_pod_netns(&b.uid, &[ip(&b)]).unwrap().id(), id(&b));
    assert!(matches!(
        scan.find_pod_netns(&a.uid, &[ip(&b)]),
        Err(PodNetnsError::AddressMismatch { .. })
    ));
}

#[test]
fn processes_of_one_pod_in_two_namespaces_are_refused() {
    let (_topology, a, b) = two_pods();
    let proc = FakeProc::new();
    proc.process(10, &systemd_cgroup(&a), &a.netns_path());
    proc.process(11, &systemd_cgroup(&a), &b.netns_path());

    match proc.find(&a, &[ip(&a)]) {
        Err(PodNetnsError::Ambiguous { mut namespaces }) => {
            let mut expected = vec![id(&a), id(&b)];
            let inode = |id: &NetnsId| id.to_string();
            namespaces.sort_by_key(inode);
            expected.sort_by_key(inode);
            assert_eq!(namespaces, expected);
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
}

#[test]
fn every_address_of_the_pod_must_be_in_the_namespace() {
    let (_topology, a, b) = two_pods();
    let proc = FakeProc::new();
    proc.process(10, &systemd_cgroup(&a), &a.netns_path());

    for ips in [vec![ip(&b)], vec![ip(&a), ip(&b)]] {
        match proc.find(&a, &ips) {
            Err(PodNetnsError::AddressMismatch { netns, ip: missing }) => {
                assert_eq!(netns, id(&a));
                assert_eq!(missing, ip(&b));
            }
            other => panic!("{ips:?}: expected AddressMismatch, got {other:?}"),
        }
    }
}

#[test]
fn a_pod_without_processes_is_not_found() {
    let (_topology, a, b) = two_pods();
    let proc = FakeProc::new();
    assert!(matches!(
        proc.find(&a, &[ip(&a)]),
        Err(PodNetnsError::NoProcess)
    ));
    proc.process(20, &systemd_cgroup(&b), &b.netns_path());
    assert!(matches!(
        proc.find(&a, &[ip(&a)]),
        Err(PodNetnsError::NoProcess)
    ));
}

#[test]
fn a_pod_in_the_agents_own_namespace_is_refused() {
    let (_topology, a, _) = two_pods();
    let proc = FakeProc::new();
    proc.process(10, &systemd_cgroup(&a), Path::new("/proc/self/ns/net"));
    let own = Netns::current().unwrap().id();
    match proc.find(&a, &[ip(&a)]) {
        Err(PodNetnsError::HostNamespace(netns)) => assert_eq!(netns, own),
        other => panic!("expected HostNamespace, got {other:?}"),
    }
}

#[test]
fn an_impostor_holding_the_pods_address_is_never_returned() {
    let (_topology, victim, impostor) = two_pods();
    let stolen = format!("{}/32", victim.ip);
    let added = Command::new("ip")
        .args(["-n", &impostor.netns, "addr", "add", &stolen, "dev", "lo"])
        .status()
        .unwrap();
    assert!(added.success(), "adding {stolen} to {}", impostor.netns);
    let proc = FakeProc::new();
    proc.process(20, &systemd_cgroup(&impostor), &impostor.netns_path());

    // Found by address, the impostor would pass for the victim; by process, it never does.
    assert!(matches!(
        proc.find(&victim, &[ip(&victim)]),
        Err(PodNetnsError::NoProcess)
    ));
    proc.process(10, &cgroupfs_cgroup(&victim), &victim.netns_path());
    assert_eq!(
        proc.find(&victim, &[ip(&victim)]).unwrap().id(),
        id(&victim)
    );
}

#[test]
fn the_labs_pod_processes_are_found_in_both_layouts() {
    let (topology, a, b) = two_pods();
    let host = HostProc::new("/proc");
    let a_process = topology
        .start_pod_process(&a, CgroupLayout::Systemd)
        .unwrap();
    let b_process = topology
        .start_pod_process(&b, CgroupLayout::Cgroupfs)
        .unwrap();

    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", a_process.pid())).unwrap();
    let slice = format!("-pod{}.slice/cri-containerd-", a.uid.replace('-', "_"));
    assert!(cgroup.contains(&slice), "{cgroup}");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", b_process.pid())).unwrap();
    assert!(
        cgroup.contains(&format!("/kubepods/besteffort/pod{}/", b.uid)),
        "{cgroup}"
    );

    assert_eq!(host.find_pod_netns(&a.uid, &[ip(&a)]).unwrap().id(), id(&a));
    assert_eq!(host.find_pod_netns(&b.uid, &[ip(&b)]).unwrap().id(), id(&b));
}

#[test]
fn the_labs_pod_processes_can_disagree_and_stop() {
    let (topology, a, b) = two_pods();
    let host = HostProc::new("/proc");
    let process = topology
        .start_pod_process(&a, CgroupLayout::Systemd)
        .unwrap();
    let stray = topology
        .start_process_of_pod_in(&a.uid, &b.netns, CgroupLayout::Systemd)
        .unwrap();
    assert!(matches!(
        host.find_pod_netns(&a.uid, &[ip(&a)]),
        Err(PodNetnsError::Ambiguous { .. })
    ));

    let stray_cgroup = stray.cgroup().to_owned();
    drop(stray);
    assert!(!stray_cgroup.exists(), "{}", stray_cgroup.display());
    assert_eq!(host.find_pod_netns(&a.uid, &[ip(&a)]).unwrap().id(), id(&a));

    // The lab's cgroups: the container's, its pod's, the QoS class's, kubepods', the lab's.
    let lab_cgroup = process.cgroup().ancestors().nth(4).unwrap().to_owned();
    drop(process);
    assert!(matches!(
        host.find_pod_netns(&a.uid, &[ip(&a)]),
        Err(PodNetnsError::NoProcess)
    ));
    assert!(lab_cgroup.exists(), "{}", lab_cgroup.display());
    drop(topology);
    assert!(!lab_cgroup.exists(), "{}", lab_cgroup.display());
}

#[tokio::test]
async fn a_cluster_gives_its_pods_processes_when_asked() {
    let mut cluster = Cluster::builder(&agent_binary())
        .pod_processes(CgroupLayout::Cgroupfs)
        .node("node1")
        .ambient_namespace("shop")
        .pod("node1", "shop", "client")
        .start()
        .await
        .unwrap();
    let client = cluster.pod("client").unwrap().clone();
    let host = HostProc::new("/proc");
    let found = host.find_pod_netns(&client.uid, &[ip(&client)]).unwrap();
    assert_eq!(found.id(), id(&client));

    cluster.stop_pod_process("client");
    assert!(matches!(
        host.find_pod_netns(&client.uid, &[ip(&client)]),
        Err(PodNetnsError::NoProcess)
    ));
    cluster
        .start_pod_process("client", CgroupLayout::Systemd)
        .unwrap();
    let found = host.find_pod_netns(&client.uid, &[ip(&client)]).unwrap();
    assert_eq!(found.id(), id(&client));
}
