//! Capture with eBPF (the `ambit-ebpf` objects, built by `build.rs` and embedded), with policy
//! routing that delivers the pod's outbound TCP locally ([`Steering::AllTcp`]):
//!
//! - the inbound object is loaded once: its tc program is attached to every captured pod's
//!   interfaces, and its socket hash holds every pod's inbound listeners, by pod address;
//! - per pod, a small outbound object: its sk_lookup program, attached to the pod's namespace,
//!   has the pod's address and its listeners in maps of its own. Once attached, only the link
//!   and the counters are kept; the kernel holds the rest. One loader loads every object, and
//!   keeps no kernel BTF: the programs need no relocation.
//!
//! Restarts fail closed without pinning anything. The tc filter is attached through netlink and
//! outlives the agent: while no agent runs, its socket hash is empty (the listeners closed with
//! the agent), so new inbound connections are dropped. The sk_lookup link goes away with the
//! agent, and the routing, which stays, then delivers outbound connections to no socket: they are
//! refused. The next agent replaces the filter's program atomically and attaches a new link.
//!
//! While a pod is captured, a [`links::Watcher`] attaches the inbound program to every
//! interface added to it.

mod links;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::mem;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ambit_ebpf_common::{counter, listener, listener_key, names};
use aya::maps::{Array, MapData, PerCpuArray, SockHash, SockMap};
use aya::programs::sk_lookup::SkLookupLink;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, SkLookup, TcAttachType};
use aya::{EbpfLoader, include_bytes_aligned};
use socket2::SockRef;

use super::{CaptureBackend, CaptureCounters, CaptureError, CaptureTarget, NetSysctls};
use crate::AGENT_MARK;
use crate::netns::{Netns, NetnsId};
use crate::routing::{self, Steering};

/// The objects, or nothing when the agent was built without the eBPF toolchain.
static INBOUND_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-inbound"));
static OUTBOUND_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-outbound"));

/// Where ambit's filter sits on each of the pod's interfaces, so that the next agent replaces it.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0xa3b);

/// Why this kernel, these privileges or this build cannot capture with eBPF.
#[derive(Debug, thiserror::Error)]
pub enum EbpfUnavailable {
    #[error(
        "this ambit was built without its eBPF programs (install the toolchain with \
         scripts/install-ebpf-toolchain and rebuild)"
    )]
    NotBuilt,
    #[error(
        "the kernel refused to load the programs ({0}); eBPF capture needs CAP_BPF and CAP_NET_ADMIN, and a kernel with sk_lookup (5.9 or later) and bpf_sk_assign at tc"
    )]
    Load(String),
    #[error(
        "{} is read-only, and eBPF capture sets each pod interface's accept_local under it: mount \
         the host's /proc/sys/net there writable",
        .0.display()
    )]
    ReadOnlySysctls(PathBuf),
    #[error("failed to inspect {}, where eBPF capture sets pods' sysctls", .0.display())]
    InspectSysctls(PathBuf, #[source] nix::Error),
}

/// Numbers each capture, so that a link watcher acts only for the capture it was started with.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// The eBPF capture backend.
#[derive(Debug)]
pub struct Ebpf {
    shared: Arc<Shared>,
    /// What the outbound programs of released pods counted.
    retired: Mutex<CaptureCounters>,
}

/// What the backend shares with the pods' link watchers.
#[derive(Debug)]
struct Shared {
    /// Loads every pod's outbound object.
    loader: Mutex<EbpfLoader<'static>>,
    /// The inbound object: attaching its program and filling its socket hash go through it.
    inbound: Mutex<aya::Ebpf>,
    pods: Mutex<Pods>,
    sysctls: NetSysctls,
}

/// The captured pods, by namespace.
#[derive(Debug, Default)]
struct Pods {
    captures: HashMap<NetnsId, PodCapture>,
}

/// One pod's capture.
#[derive(Debug)]
struct PodCapture {
    /// The pod's address in the cluster.
    pod_ip: Ipv4Addr,
    /// Dropping it detaches the pod's outbound program.
    _outbound: SkLookupLink,
    outbound_counters: OutboundCounters,
    /// The indexes of the interfaces the inbound program is attached to.
    interfaces: HashSet<u32>,
    /// Also tells, of two pods at one address, which was captured last: its listeners are the
    /// ones in the inbound socket hash.
    generation: u64,
    /// Captures the interfaces added later; stops when dropped.
    _links: links::Watcher,
}

/// What a pod's outbound program counted.
struct OutboundCounters(PerCpuArray<MapData, u64>);

impl fmt::Debug for OutboundCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutboundCounters")
    }
}

impl Ebpf {
    /// Loads the inbound object, which checks that the programs are built in and that the
    /// kernel accepts them, and checks that pods' sysctls can be written through `sysctls`.
    pub fn new(sysctls: NetSysctls) -> Result<Self, EbpfUnavailable> {
        let unavailable = |error| match error {
            LoadError::NotBuilt => EbpfUnavailable::NotBuilt,
            LoadError::Kernel(reason) => EbpfUnavailable::Load(reason),
        };
        let mut loader = loader();
        let inbound = load_inbound(&mut loader).map_err(unavailable)?;
        // The outbound object too, for a pod that is never enrolled: a kernel that refuses it
        // is found now, not at the first pod.
        load_outbound(&mut loader).map_err(unavailable)?;
        // Refused now rather than pod by pod: `auto` then falls back to nftables, which writes
        // sysctls only to undo an earlier eBPF capture.
        match sysctls.is_read_only() {
            Ok(false) => {}
            Ok(true) => return Err(EbpfUnavailable::ReadOnlySysctls(sysctls.dir().into())),
            Err(error) => {
                return Err(EbpfUnavailable::InspectSysctls(sysctls.dir().into(), error));
            }
        }
        Ok(Self {
            shared: Arc::new(Shared {
                loader: Mutex::new(loader),
                inbound: Mutex::new(inbound),
                pods: Mutex::default(),
                sysctls,
            }),
            retired: Mutex::default(),
        })
    }

    /// Keeps what a pod's outbound program counted once it is gone.
    fn retire(&self, capture: &PodCapture) {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        add(&mut retired, counted(&capture.outbound_counters.0));
    }
}

impl Shared {
    fn pods(&self) -> MutexGuard<'_, Pods> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inbound(&self) -> MutexGuard<'_, aya::Ebpf> {
        self.inbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads an outbound object for the pod at `pod_ip`.
    fn load_outbound(&self, pod_ip: Ipv4Addr) -> Result<aya::Ebpf, CaptureError> {
        let mut loader = self.loader.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outbound =
            load_outbound(&mut loader).map_err(|e| CaptureError::Ebpf(e.to_string()))?;
        drop(loader);
        let mut address: Array<&mut MapData, u32> = map_mut(&mut outbound, names::POD_IP_MAP)?;
        address
            .set(0, u32::from_ne_bytes(pod_ip.octets()), 0)
            .map_err(|e| ebpf_error("setting the pod's address", e))?;
        Ok(outbound)
    }
}

/// Registers a pod's inbound listeners under its cluster address `pod_ip`, which it takes from
/// any pod that held it before (a pod reusing the address of one still being torn down). Its
/// other addresses get no listener, so connections to them are dropped (the agent would refuse
/// them): registering every address a pod claims would let one pod fill the socket hash, or
/// take a neighbour's traffic by adding its address.
fn register_listeners(
    shared: &Shared,
    pod_ip: Ipv4Addr,
    target: &CaptureTarget,
) -> Result<(), CaptureError> {
    let mut inbound = shared.inbound();
    let mut listeners = inbound_listeners(&mut inbound)?;
    for (index, socket) in [
        (listener::INBOUND_PLAINTEXT, &target.inbound_plaintext),
        (listener::HBONE, &target.hbone),
    ] {
        if let Err(error) =
            listeners.insert(listener_key(pod_ip.octets(), index), socket.as_raw_fd(), 0)
        {
            // Neither listener then: the pod's inbound fails closed, whatever its port.
            forget(&mut listeners, pod_ip);
            return Err(ebpf_error(
                "adding an inbound listener to the socket hash (full at 2,048 pods?)",
                error,
            ));
        }
    }
    Ok(())
}

impl Pods {
    /// Removes the pod's capture, and its listeners from the socket hash unless a pod captured
    /// after it holds its address.
    fn remove(&mut self, shared: &Shared, netns: NetnsId) -> Option<PodCapture> {
        let capture = self.captures.remove(&netns)?;
        let taken = self
            .captures
            .values()
            .any(|pod| pod.pod_ip == capture.pod_ip && pod.generation > capture.generation);
        if !taken {
            match inbound_listeners(&mut shared.inbound()) {
                Ok(mut listeners) => forget(&mut listeners, capture.pod_ip),
                Err(error) => {
                    tracing::warn!(%netns, error = %chain(&error), "failed to remove the pod's inbound listeners");
                }
            }
        }
        Some(capture)
    }
}

/// Removes the inbound listeners registered under `address`. One that is not there is gone
/// already: a listener leaves the hash when it closes.
fn forget(listeners: &mut SockHash<&mut MapData, u64>, address: Ipv4Addr) {
    for index in [listener::INBOUND_PLAINTEXT, listener::HBONE] {
        match listeners.remove(&listener_key(address.octets(), index)) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {}
            Err(error) => {
                tracing::warn!(%address, error = %chain(&error), "failed to remove an inbound listener");
            }
        }
    }
}

impl CaptureBackend for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn enable(&self, target: &CaptureTarget) -> Result<(), CaptureError> {
        let IpAddr::V4(pod_ip) = target.pod_ip else {
            return Err(CaptureError::Ipv6Pod(target.pod_ip));
        };
        let netns = Netns::current().map_err(CaptureError::Netns)?;
        // The inbound listeners' packets (and their accepted connections') go out by the main
        // table, not to the local delivery that catches the pod's own outbound TCP.
        for listener in [&target.inbound_plaintext, &target.hbone] {
            SockRef::from(listener)
                .set_mark(AGENT_MARK)
                .map_err(|e| ebpf_error("marking an inbound listener", e))?;
        }
        let mut outbound = self.shared.load_outbound(pod_ip)?;
        let mut pod_listeners: SockMap<&mut MapData> =
            map_mut(&mut outbound, names::POD_LISTENERS_MAP)?;
        for (index, socket) in [
            (listener::OUTBOUND, &target.outbound),
            (listener::DNS_UDP, &target.dns_udp),
            (listener::DNS_TCP, &target.dns_tcp),
        ] {
            pod_listeners
                .set(index, socket, 0)
                .map_err(|e| ebpf_error("adding a listener to the pod's socket map", e))?;
        }

        routing::install(Steering::AllTcp { pod_ip }).map_err(CaptureError::Routing)?;
        let program: &mut SkLookup = program(&mut outbound, names::OUTBOUND_PROGRAM)?;
        let link = program
            .attach(&netns)
            .map_err(|e| ebpf_error("attaching the outbound program", e))?;
        let link = program
            .take_link(link)
            .map_err(|e| ebpf_error("taking the outbound link", e))?;
        let outbound_counters = outbound
            .take_map(names::COUNTERS_MAP)
            .ok_or_else(|| CaptureError::Ebpf(format!("no map {}", names::COUNTERS_MAP)))
            .and_then(|map| PerCpuArray::try_from(map).map_err(|e| ebpf_error("counters", e)))
            .map(OutboundCounters)?;
        // The rest of the object goes: the link holds the program, and the program its maps.
        drop(outbound);

        // Subscribed before the interfaces are listed, the watcher hears of any added since.
        let subscription = links::Subscription::new()?;
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let id = netns.id();
        let watcher = links::Watcher::start(subscription, self.shared.clone(), netns, generation)?;
        let capture = PodCapture {
            pod_ip,
            _outbound: link,
            outbound_counters,
            interfaces: HashSet::new(),
            generation,
            _links: watcher,
        };
        // Under the lock, so that the watcher of a capture this one replaces cannot attach its
        // program in between.
        let mut pods = self.shared.pods();
        if let Some(replaced) = pods.captures.insert(id, capture) {
            self.retire(&replaced);
        }
        let captured = register_listeners(&self.shared, pod_ip, target)
            .and_then(|()| pods.capture_interfaces(&self.shared, id));
        if captured.is_err()
            && let Some(failed) = pods.remove(&self.shared, id)
        {
            self.retire(&failed);
        }
        drop(pods);
        // An nftables capture in place goes once this one is in: make-before-break.
        captured.and_then(|()| super::nftables::remove_table())
    }

    fn disable(&self) -> Result<(), CaptureError> {
        let netns = Netns::current().map_err(CaptureError::Netns)?;
        let removed = self.shared.pods().remove(&self.shared, netns.id());
        if let Some(capture) = removed {
            self.retire(&capture);
        }
        super::remove_all(&self.shared.sysctls)
    }

    /// Stops the link watchers, which would otherwise attach this agent's program over the
    /// successor's, and drops the outbound links: the successor attached its own. The socket
    /// hash and the filters are left as they are.
    fn relinquish(&self) {
        let captures = mem::take(&mut self.shared.pods().captures);
        for capture in captures.values() {
            self.retire(capture);
        }
    }

    fn counters(&self) -> Option<CaptureCounters> {
        let mut total = *self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        for capture in self.shared.pods().captures.values() {
            add(&mut total, counted(&capture.outbound_counters.0));
        }
        let mut inbound = self.shared.inbound();
        if let Some(Ok(counters)) = inbound
            .map_mut(names::COUNTERS_MAP)
            .map(PerCpuArray::<&mut MapData, u64>::try_from)
        {
            add(&mut total, counted(&counters));
        }
        Some(total)
    }
}

impl Pods {
    /// Captures every interface of the calling thread's namespace, the pod's, but loopback.
    fn capture_interfaces(&mut self, shared: &Shared, netns: NetnsId) -> Result<(), CaptureError> {
        let Some(pod) = self.captures.get_mut(&netns) else {
            return Ok(());
        };
        let mut inbound = shared.inbound();
        let program: &mut SchedClassifier = program(&mut inbound, names::INBOUND_PROGRAM)?;
        for interface in interfaces()? {
            capture_interface(program, &shared.sysctls, &interface.name)?;
            pod.interfaces.insert(interface.index);
        }
        Ok(())
    }

    /// After a change of the pod's links: captures the interfaces again, logging those that are
    /// new. An interface that cannot be captured is tried again at the next change.
    fn capture_new_interfaces(&mut self, shared: &Shared, netns: NetnsId) {
        let Some(pod) = self.captures.get_mut(&netns) else {
            return;
        };
        let mut inbound = shared.inbound();
        let (program, current) = match (
            program::<SchedClassifier>(&mut inbound, names::INBOUND_PROGRAM),
            interfaces(),
        ) {
            (Ok(program), Ok(current)) => (program, current),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%netns, error = %chain(&error), "failed to capture the pod's new interfaces");
                return;
            }
        };
        pod.interfaces
            .retain(|index| current.iter().any(|interface| interface.index == *index));
        for interface in current {
            // Where the program is attached already, it is replaced in place: an interface
            // removed and added again under the same index is captured too.
            match capture_interface(program, &shared.sysctls, &interface.name) {
                Ok(()) => {
                    if pod.interfaces.insert(interface.index) {
                        tracing::info!(%netns, interface = %interface.name, "captured a new interface of the pod");
                    }
                }
                Err(error) => {
                    pod.interfaces.remove(&interface.index);
                    tracing::warn!(%netns, interface = %interface.name, error = %chain(&error), "failed to capture a new interface of the pod");
                }
            }
        }
    }
}

/// Why an object could not be loaded.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("the programs are not built in")]
    NotBuilt,
    #[error("{0}")]
    Kernel(String),
}

/// The loader of every object, without the kernel's BTF: the programs need no relocation, and
/// the parsed BTF takes megabytes (aya parses it when a loader is made, once here).
fn loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

/// Loads the inbound object and its program into the kernel.
fn load_inbound(loader: &mut EbpfLoader<'_>) -> Result<aya::Ebpf, LoadError> {
    let mut object = load_object("ambit-inbound", INBOUND_OBJECT, loader)?;
    load_program::<SchedClassifier>(&mut object, names::INBOUND_PROGRAM)?;
    Ok(object)
}

/// Loads an outbound object and its program into the kernel; its pod's address is not set.
fn load_outbound(loader: &mut EbpfLoader<'_>) -> Result<aya::Ebpf, LoadError> {
    let mut object = load_object("ambit-outbound", OUTBOUND_OBJECT, loader)?;
    load_program::<SkLookup>(&mut object, names::OUTBOUND_PROGRAM)?;
    Ok(object)
}

/// Creates the maps of the object `name`.
fn load_object(
    name: &str,
    object: &[u8],
    loader: &mut EbpfLoader<'_>,
) -> Result<aya::Ebpf, LoadError> {
    if object.is_empty() {
        return Err(LoadError::NotBuilt);
    }
    loader
        .load(object)
        .map_err(|e| LoadError::Kernel(format!("loading the object {name}: {}", chain(&e))))
}

fn load_program<'e, P>(object: &'e mut aya::Ebpf, name: &str) -> Result<(), LoadError>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: Loadable + 'e,
{
    let program: &mut P = program(object, name).map_err(|e| LoadError::Kernel(chain(&e)))?;
    program
        .load_program()
        .map_err(|e| LoadError::Kernel(format!("{name}: {}", chain(&e))))
}

/// The programs' `load`, which aya gives each program type but no trait.
trait Loadable {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl Loadable for SchedClassifier {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl Loadable for SkLookup {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

/// The inbound object's socket hash.
fn inbound_listeners(inbound: &mut aya::Ebpf) -> Result<SockHash<&mut MapData, u64>, CaptureError> {
    map_mut(inbound, names::INBOUND_LISTENERS_MAP)
}

/// Steers the new inbound connections that arrive by `interface` to the agent.
fn capture_interface(
    program: &mut SchedClassifier,
    sysctls: &NetSysctls,
    interface: &str,
) -> Result<(), CaptureError> {
    attach_inbound(program, interface)?;
    // The reverse-path check would otherwise drop inbound packets: with all TCP routed locally,
    // their source looks local. Set after the program is attached: until then the check drops
    // the pod's inbound TCP, which is closed rather than open.
    set_accept_local(sysctls, interface, true)
}

/// Attaches the inbound program to `interface`'s ingress, replacing the one an earlier agent
/// attached there.
fn attach_inbound(program: &mut SchedClassifier, interface: &str) -> Result<(), CaptureError> {
    match tc::qdisc_add_clsact(interface) {
        Err(tc::TcError::NetlinkError(error))
            if error.raw_os_error() == Some(nix::libc::EEXIST) => {}
        other => other.map_err(|e| ebpf_error("adding the clsact qdisc", e))?,
    }
    let earlier = SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        FILTER_PRIORITY,
        FILTER_HANDLE,
        None,
    )
    .map_err(|e| ebpf_error("finding the interface", e))?;
    let link = match program.attach_to_link(earlier) {
        Ok(link) => link,
        Err(_) => {
            let options = NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                classid: None,
            };
            program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(options),
                )
                .map_err(|e| ebpf_error("attaching the inbound program", e))?
        }
    };
    let link = program
        .take_link(link)
        .map_err(|e| ebpf_error("taking the inbound link", e))?;
    // The filter must outlive this agent: dropping the link would detach it, and a restart
    // would then let new inbound connections reach the app uncaptured.
    mem::forget(link);
    Ok(())
}

/// Detaches ambit's filter from every interface of the calling thread's namespace and restores
/// the reverse-path check.
pub(super) fn detach_filters(sysctls: &NetSysctls) -> Result<(), CaptureError> {
    for Interface { name, .. } in interfaces()? {
        match tc::qdisc_detach_program(&name, TcAttachType::Ingress, names::INBOUND_PROGRAM) {
            Ok(()) => set_accept_local(sysctls, &name, false)?,
            Err(tc::TcError::IoError(error)) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(ebpf_error("detaching the inbound program", error)),
        }
    }
    Ok(())
}

struct Interface {
    index: u32,
    name: String,
}

/// The namespace's interfaces, but loopback.
fn interfaces() -> Result<Vec<Interface>, CaptureError> {
    let interfaces =
        nix::net::if_::if_nameindex().map_err(|e| ebpf_error("listing the pod's interfaces", e))?;
    Ok(interfaces
        .iter()
        .map(|interface| Interface {
            index: interface.index(),
            name: interface.name().to_string_lossy().into_owned(),
        })
        .filter(|interface| interface.name != "lo")
        .collect())
}

/// `net.ipv4.conf.<interface>.accept_local` of the calling thread's namespace.
fn set_accept_local(
    sysctls: &NetSysctls,
    interface: &str,
    accept: bool,
) -> Result<(), CaptureError> {
    sysctls.write(
        &format!("ipv4/conf/{interface}/accept_local"),
        if accept { "1" } else { "0" },
    )
}

fn program<'e, P>(programs: &'e mut aya::Ebpf, name: &str) -> Result<&'e mut P, CaptureError>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    programs
        .program_mut(name)
        .ok_or_else(|| CaptureError::Ebpf(format!("the object has no program {name}")))?
        .try_into()
        .map_err(|e| ebpf_error(name, e))
}

fn map_mut<'e, M>(programs: &'e mut aya::Ebpf, name: &str) -> Result<M, CaptureError>
where
    M: TryFrom<&'e mut aya::maps::Map, Error = aya::maps::MapError>,
{
    programs
        .map_mut(name)
        .ok_or_else(|| CaptureError::Ebpf(format!("the object has no map {name}")))?
        .try_into()
        .map_err(|e| ebpf_error(name, e))
}

/// What a program counted; zero where a counter cannot be read.
fn counted<T: std::borrow::Borrow<MapData>>(counters: &PerCpuArray<T, u64>) -> CaptureCounters {
    let read = |index| {
        counters
            .get(&index, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    };
    CaptureCounters {
        inbound_steered: read(counter::INBOUND_STEERED),
        inbound_dropped: read(counter::INBOUND_DROPPED),
        outbound_steered: read(counter::OUTBOUND_STEERED),
        outbound_dropped: read(counter::OUTBOUND_DROPPED),
        inbound_unclassified: read(counter::INBOUND_UNCLASSIFIED),
    }
}

fn add(total: &mut CaptureCounters, more: CaptureCounters) {
    total.inbound_steered += more.inbound_steered;
    total.inbound_dropped += more.inbound_dropped;
    total.outbound_steered += more.outbound_steered;
    total.outbound_dropped += more.outbound_dropped;
    total.inbound_unclassified += more.inbound_unclassified;
}

fn ebpf_error(what: &str, error: impl std::error::Error) -> CaptureError {
    CaptureError::Ebpf(format!("{what}: {}", chain(&error)))
}

/// An error and its causes, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
