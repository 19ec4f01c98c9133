//! A small cluster of network namespaces on one machine: an underlay with a bridge, nodes
//! attached to it, and pods attached to their node by veth pairs with point-to-point routes, as
//! a CNI would wire them. `ambit demo` and the integration tests build on it.
//!
//! Every name a topology creates carries its owner's PID and a slot number that no other live
//! topology holds, so topologies can run side by side; everything is removed when the topology
//! is dropped, and leftovers of a process that died are swept away by the next topology.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};

use super::pod_process::{self, CgroupLayout, LabCgroups, PodProcess, PodProcessError};

/// Every namespace a topology creates starts with this.
const PREFIX: &str = "ambit-lab";
/// Where slot locks live; a lock is released by the kernel when its holder dies.
const LOCK_DIR: &str = "/run/ambit-lab";
const SLOTS: u8 = 250;

/// Why the topology could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("failed to run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("failed to lock a topology slot in {LOCK_DIR}")]
    Lock(#[source] io::Error),
    #[error("all {SLOTS} topology slots are taken")]
    NoSlot,
}

/// A node: a namespace on the underlay.
#[derive(Debug, Clone)]
pub struct NodeNs {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    index: u8,
    pods: u8,
}

/// A pod: a namespace behind its node.
#[derive(Debug, Clone)]
pub struct PodNs {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// A UUID, as Kubernetes gives pods, derived from the namespace's name.
    pub uid: String,
}

impl PodNs {
    /// The path of its namespace, for opening it.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

/// A namespace joined to a pod by an interface added to the pod after it started, as a
/// secondary network (Multus) would add one. Dropping it removes the namespace, and with it
/// both ends of the link.
#[derive(Debug)]
pub struct SideNetwork {
    /// Named after the pod's namespace, so that a topology sweeps it up if its owner dies.
    pub netns: String,
    /// The namespace's address, reached from the pod through `interface`.
    pub ip: Ipv4Addr,
    /// An address of the pod's own on `interface`, besides its main one.
    pub pod_ip: Ipv4Addr,
    /// The pod's new interface.
    pub interface: String,
}

impl SideNetwork {
    /// The path of its namespace, for opening it.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

impl Drop for SideNetwork {
    fn drop(&mut self) {
        delete_netns(&self.netns);
    }
}

/// A host outside the cluster on the underlay (a server on the Internet, or in the data
/// centre): a namespace with addresses there and a route to every node's pods.
#[derive(Debug, Clone)]
pub struct ExternalHost {
    pub netns: String,
    /// Its addresses, the first its main one.
    pub ips: Vec<Ipv4Addr>,
}

impl ExternalHost {
    /// The path of its namespace, for opening it.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

/// Where `ip netns exec` finds a namespace's own `/etc` files (it bind-mounts them).
const NETNS_ETC: &str = "/etc/netns";

/// The namespaces of one topology; dropping it removes them all.
#[derive(Debug)]
pub struct Topology {
    id: String,
    slot: u8,
    underlay: String,
    nodes: Vec<NodeNs>,
    pods: Vec<PodNs>,
    external: Vec<ExternalHost>,
    /// Dropped after the namespaces, so that their processes are gone first.
    cgroups: LabCgroups,
    _slot_lock: Flock<File>,
}

impl Topology {
    /// An underlay namespace with a bridge, and nothing on it yet.
    pub fn new() -> Result<Self, TopologyError> {
        sweep_leftovers();
        let (slot, lock) = lock_slot()?;
        let id = format!("{PREFIX}-{}-{slot}", std::process::id());
        let underlay = format!("{id}-underlay");
        let topology = Self {
            slot,
            underlay: underlay.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            external: Vec::new(),
            cgroups: LabCgroups::new(&id),
            id,
            _slot_lock: lock,
        };
        ip(&["netns", "add", &underlay])?;
        ip_in(&underlay, &["link", "set", "lo", "up"])?;
        ip_in(&underlay, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&underlay, &["link", "set", "br0", "up"])?;
        Ok(topology)
    }

    pub fn nodes(&self) -> &[NodeNs] {
        &self.nodes
    }

    pub fn pods(&self) -> &[PodNs] {
        &self.pods
    }

    /// Adds a node, routed to every other node's pods.
    pub fn add_node(&mut self, name: &str) -> Result<NodeNs, TopologyError> {
        let index = u8::try_from(self.nodes.len() + 1).unwrap_or(u8::MAX);
        let node = NodeNs {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.id),
            ip: Ipv4Addr::new(10, self.slot, 0, index),
            index,
            pods: 0,
        };
        let underlay_end = format!("n{index}");
        ip(&["netns", "add", &node.netns])?;
        ip_in(&node.netns, &["link", "set", "lo", "up"])?;
        veth((&underlay_end, &self.underlay), ("eth0", &node.netns))?;
        ip_in(
            &self.underlay,
            &["link", "set", &underlay_end, "master", "br0", "up"],
        )?;
        ip_in(
            &node.netns,
            &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
        )?;
        ip_in(&node.netns, &["link", "set", "eth0", "up"])?;
        sysctl(&node.netns, "net.ipv4.ip_forward", "1")?;
        for other in &self.nodes {
            ip_in(
                &node.netns,
                &[
                    "route",
                    "add",
                    &pod_cidr(self.slot, other.index),
                    "via",
                    &other.ip.to_string(),
                ],
            )?;
            ip_in(
                &other.netns,
                &[
                    "route",
                    "add",
                    &pod_cidr(self.slot, index),
                    "via",
                    &node.ip.to_string(),
                ],
            )?;
        }
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Adds a host outside the cluster with `addresses` addresses on the underlay, routed to
    /// the pods of the nodes added so far.
    pub fn add_external_host(
        &mut self,
        name: &str,
        addresses: u8,
    ) -> Result<ExternalHost, TopologyError> {
        let first = 100 + 10 * u8::try_from(self.external.len()).unwrap_or(u8::MAX);
        let host = ExternalHost {
            netns: format!("{}-{name}", self.id),
            ips: (0..addresses.max(1))
                .map(|i| Ipv4Addr::new(10, self.slot, 0, first.saturating_add(i)))
                .collect(),
        };
        let underlay_end = format!("x{}", self.external.len());
        ip(&["netns", "add", &host.netns])?;
        self.external.push(host.clone());
        ip_in(&host.netns, &["link", "set", "lo", "up"])?;
        veth((&underlay_end, &self.underlay), ("eth0", &host.netns))?;
        ip_in(
            &self.underlay,
            &["link", "set", &underlay_end, "master", "br0", "up"],
        )?;
        for address in &host.ips {
            let address = format!("{address}/24");
            ip_in(&host.netns, &["addr", "add", &address, "dev", "eth0"])?;
        }
        ip_in(&host.netns, &["link", "set", "eth0", "up"])?;
        for node in &self.nodes {
            let cidr = pod_cidr(self.slot, node.index);
            ip_in(
                &host.netns,
                &["route", "add", &cidr, "via", &node.ip.to_string()],
            )?;
        }
        Ok(host)
    }

    /// The resolv.conf that commands run in the pod's namespace by `ip netns exec` (such as
    /// [`command_in`](Self::command_in)) read as `/etc/resolv.conf`.
    pub fn write_resolv_conf(&self, pod: &PodNs, text: &str) -> io::Result<()> {
        let dir = Path::new(NETNS_ETC).join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), text)
    }

    /// Adds a pod on `node`, wired like a point-to-point CNI: a /32 on the pod's `eth0`, a
    /// default route through the node, and a host route to the pod on the node.
    pub fn add_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> Result<PodNs, TopologyError> {
        let slot = self.slot;
        let Some(host) = self.nodes.iter_mut().find(|n| n.name == node) else {
            return Err(TopologyError::Command {
                command: format!("add pod {namespace}/{name}"),
                stderr: format!("no node {node}"),
            });
        };
        host.pods += 1;
        let gateway = Ipv4Addr::new(10, slot, host.index, 1);
        let netns = format!("{}-{namespace}-{name}", self.id);
        let pod = PodNs {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            uid: pod_process::uid_for(&netns),
            netns,
            ip: Ipv4Addr::new(10, slot, host.index, 9 + host.pods),
        };
        let host_end = format!("p{}", host.pods);
        let host_netns = host.netns.clone();
        ip(&["netns", "add", &pod.netns])?;
        ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
        veth((&host_end, &host_netns), ("eth0", &pod.netns))?;
        ip_in(
            &host_netns,
            &["addr", "add", &format!("{gateway}/32"), "dev", &host_end],
        )?;
        ip_in(&host_netns, &["link", "set", &host_end, "up"])?;
        ip_in(
            &host_netns,
            &["route", "add", &format!("{}/32", pod.ip), "dev", &host_end],
        )?;
        ip_in(
            &pod.netns,
            &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
        )?;
        ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                &gateway.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds an interface, `net1`, to the running `pod`, joined to a new namespace, with a second
    /// address of the pod's on it: each side has host routes to the other's addresses through
    /// the new link. Creates the link down, then brings it up.
    pub fn attach_side_network(&self, pod: &str) -> Result<SideNetwork, TopologyError> {
        let Some((index, pod)) = self.pods.iter().enumerate().find(|(_, p)| p.name == pod) else {
            return Err(TopologyError::Command {
                command: "attach a side network".to_owned(),
                stderr: format!("no pod {pod}"),
            });
        };
        let netns = format!("{}-side", pod.netns);
        let host = u8::try_from(index + 1).unwrap_or(u8::MAX);
        ip(&["netns", "add", &netns])?;
        // From here on, an error drops `side`, which deletes the namespace.
        let side = SideNetwork {
            netns,
            ip: Ipv4Addr::new(10, self.slot, 200, host),
            pod_ip: Ipv4Addr::new(10, self.slot, 201, host),
            interface: "net1".to_owned(),
        };
        ip_in(&side.netns, &["link", "set", "lo", "up"])?;
        veth(("eth0", &side.netns), (&side.interface, &pod.netns))?;
        let side_address = format!("{}/32", side.ip);
        ip_in(&side.netns, &["addr", "add", &side_address, "dev", "eth0"])?;
        ip_in(&side.netns, &["link", "set", "eth0", "up"])?;
        for pod_address in [pod.ip, side.pod_ip] {
            let pod_address = format!("{pod_address}/32");
            ip_in(&side.netns, &["route", "add", &pod_address, "dev", "eth0"])?;
        }
        let second_address = format!("{}/32", side.pod_ip);
        ip_in(
            &pod.netns,
            &["addr", "add", &second_address, "dev", &side.interface],
        )?;
        ip_in(&pod.netns, &["link", "set", &side.interface, "up"])?;
        ip_in(
            &pod.netns,
            &["route", "add", &side_address, "dev", &side.interface],
        )?;
        Ok(side)
    }

    /// Gives `pod` a second address on its interface, routed to it by its node, as a pod whose
    /// address changed while its network namespace stayed; returns the address.
    pub fn add_pod_address(&self, pod: &str) -> Result<Ipv4Addr, TopologyError> {
        let not_found = |what: &str| TopologyError::Command {
            command: "add a pod address".to_owned(),
            stderr: format!("no {what} {pod}"),
        };
        let (index, pod) = self
            .pods
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == pod)
            .ok_or_else(|| not_found("pod"))?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == pod.node)
            .ok_or_else(|| not_found("node of pod"))?;
        let host = u8::try_from(128 + index).unwrap_or(u8::MAX);
        let address = Ipv4Addr::new(10, self.slot, node.index, host);
        // The node reaches the new address by the same link as the pod's first one.
        let route = ip_in(
            &node.netns,
            &["-o", "route", "show", &format!("{}/32", pod.ip)],
        )?;
        let route = String::from_utf8_lossy(&route.stdout);
        let link = route
            .split_whitespace()
            .skip_while(|word| *word != "dev")
            .nth(1)
            .ok_or_else(|| not_found("route to pod"))?;
        let prefix = format!("{address}/32");
        ip_in(&pod.netns, &["addr", "add", &prefix, "dev", "eth0"])?;
        ip_in(&node.netns, &["route", "add", &prefix, "dev", link])?;
        Ok(address)
    }

    /// Starts a process of `pod` as kubelet leaves one: in the pod's network namespace and in a
    /// container cgroup of the pod's, named after its UID in `layout`. The process dies with the
    /// thread that started it, and when the returned handle is dropped.
    pub fn start_pod_process(
        &self,
        pod: &PodNs,
        layout: CgroupLayout,
    ) -> Result<PodProcess, PodProcessError> {
        self.cgroups.start(&pod.uid, &pod.netns, layout)
    }

    /// Starts a process in a container cgroup of the pod `uid` but in the network namespace
    /// `netns`, which need not be the pod's: a pod whose processes disagree on its namespace.
    pub fn start_process_of_pod_in(
        &self,
        uid: &str,
        netns: &str,
        layout: CgroupLayout,
    ) -> Result<PodProcess, PodProcessError> {
        self.cgroups.start(uid, netns, layout)
    }

    /// The underlay namespace, where node-to-node traffic can be observed.
    pub fn underlay(&self) -> &str {
        &self.underlay
    }

    /// Joins this machine's own namespace to the underlay, for a server that both the nodes
    /// and the caller reach (the API server); returns its address there. The link goes with
    /// the underlay.
    pub fn join_host(&self) -> Result<Ipv4Addr, TopologyError> {
        let host_end = format!("{PREFIX}-h{}", self.slot);
        let address = Ipv4Addr::new(10, self.slot, 0, 254);
        ip(&[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            &self.underlay,
        ])?;
        ip(&["addr", "add", &format!("{address}/24"), "dev", &host_end])?;
        ip(&["link", "set", &host_end, "up"])?;
        ip_in(
            &self.underlay,
            &["link", "set", "host", "master", "br0", "up"],
        )?;
        Ok(address)
    }

    /// `ip netns exec <netns> setpriv --pdeathsig KILL -- <program>`: a command that runs in
    /// `netns` and dies with the process that started it.
    pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                netns,
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
            ])
            .arg(program);
        command
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for netns in self
            .pods
            .iter()
            .map(|p| &p.netns)
            .chain(self.external.iter().map(|h| &h.netns))
            .chain(self.nodes.iter().map(|n| &n.netns))
            .chain([&self.underlay])
        {
            delete_netns(netns);
        }
    }
}

fn pod_cidr(slot: u8, node: u8) -> String {
    format!("10.{slot}.{node}.0/24")
}

/// Kills what still runs in the namespace, then deletes it.
fn delete_netns(netns: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
    let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(netns));
}

/// Deletes the namespaces and cgroups of topologies whose process is gone.
fn sweep_leftovers() {
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_is_gone(&name) {
                delete_netns(&name);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(NETNS_ETC) {
        for entry in entries.flatten() {
            if owner_is_gone(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    pod_process::sweep_leftovers(owner_is_gone);
}

/// Whether `name` is a topology's whose owner has exited: names start with the owner's PID.
fn owner_is_gone(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
        return false;
    };
    rest.split('-')
        .next()
        .and_then(|pid| pid.parse::<i32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

fn lock_slot() -> Result<(u8, Flock<File>), TopologyError> {
    std::fs::create_dir_all(LOCK_DIR).map_err(TopologyError::Lock)?;
    // Start at a slot of our own, so that a slot just released (whose namespaces may still be
    // held by exiting processes) is not the first one taken again.
    let start = std::process::id() % u32::from(SLOTS);
    for offset in 0..u32::from(SLOTS) {
        let slot = u8::try_from((start + offset) % u32::from(SLOTS) + 1).unwrap_or(1);
        let file = File::create(Path::new(LOCK_DIR).join(format!("slot-{slot}")))
            .map_err(TopologyError::Lock)?;
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok((slot, lock));
        }
    }
    Err(TopologyError::NoSlot)
}

/// A veth pair with one end, named and placed, in each namespace.
fn veth(a: (&str, &str), b: (&str, &str)) -> Result<Output, TopologyError> {
    ip(&[
        "link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ])
}

fn ip(args: &[&str]) -> Result<Output, TopologyError> {
    run(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<Output, TopologyError> {
    run(Command::new("ip").args(["-n", netns]).args(args))
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<Output, TopologyError> {
    run(Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw"])
        .arg(format!("{key}={value}")))
}

fn run(command: &mut Command) -> Result<Output, TopologyError> {
    let description = format!("{command:?}");
    let output = command.output().map_err(|source| TopologyError::Spawn {
        command: description.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(TopologyError::Command {
            command: description,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
