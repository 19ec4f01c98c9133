//! Capture with eBPF (the `ambit-ebpf` programs, built by `build.rs` and embedded): per pod, one
//! instance of the programs, its own socket map holding the agent's listeners in the pod, and
//! policy routing that delivers the pod's outbound TCP locally ([`Steering::AllTcp`]).
//!
//! Restarts fail closed without pinning anything. The tc filter is attached through netlink and
//! outlives the agent: while no agent runs, its socket map is empty (the listeners closed with
//! the agent), so new inbound connections are dropped. The sk_lookup link goes away with the
//! agent, and the routing, which stays, then delivers outbound connections to no socket: they are
//! refused. The next agent replaces the filter's program atomically and attaches a new link.
//!
//! While a pod is captured, a [`links::Watcher`] attaches the inbound program to every
//! interface added to it.

mod links;

use std::collections::{HashMap, HashSet};
use std::mem;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ambit_ebpf_common::{counter, listener, names};
use aya::maps::{MapData, PerCpuArray, SockMap};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, SkLookup, TcAttachType};
use aya::{EbpfLoader, include_bytes_aligned};
use socket2::SockRef;

use super::{CaptureBackend, CaptureCounters, CaptureError, CaptureTarget, NetSysctls};
use crate::AGENT_MARK;
use crate::netns::{Netns, NetnsId};
use crate::routing::{self, Steering};

/// The programs, or nothing when the agent was built without the eBPF toolchain.
static PROGRAMS: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-ebpf"));

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

/// The captured pods, shared with their link watchers.
type Pods = Arc<Mutex<HashMap<NetnsId, PodCapture>>>;

/// Numbers each capture, so that a link watcher acts only for the capture it was started with.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// The eBPF capture backend.
#[derive(Debug)]
pub struct Ebpf {
    pods: Pods,
    /// What the programs of released pods counted.
    retired: Mutex<CaptureCounters>,
    sysctls: NetSysctls,
}

/// One pod's capture.
#[derive(Debug)]
struct PodCapture {
    /// Dropping them detaches the sk_lookup link.
    programs: aya::Ebpf,
    /// The indexes of the interfaces the inbound program is attached to.
    interfaces: HashSet<u32>,
    generation: u64,
    sysctls: NetSysctls,
    /// Captures the interfaces added later; stops when dropped.
    _links: links::Watcher,
}

impl Ebpf {
    /// Checks that the programs are built in and that the kernel accepts them, by loading them
    /// once, and that pods' sysctls can be written through `sysctls`.
    pub fn new(sysctls: NetSysctls) -> Result<Self, EbpfUnavailable> {
        load(Ipv4Addr::UNSPECIFIED).map_err(|error| match error {
            LoadError::NotBuilt => EbpfUnavailable::NotBuilt,
            LoadError::Kernel(reason) => EbpfUnavailable::Load(reason),
        })?;
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
            pods: Pods::default(),
            retired: Mutex::default(),
            sysctls,
        })
    }

    fn pods(&self) -> MutexGuard<'_, HashMap<NetnsId, PodCapture>> {
        lock(&self.pods)
    }

    /// Keeps what a pod's programs counted once they are gone.
    fn retire(&self, programs: &aya::Ebpf) {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        add(&mut retired, counted(programs));
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
        let mut programs = load(pod_ip).map_err(|e| CaptureError::Ebpf(e.to_string()))?;
        let mut listeners: SockMap<&mut MapData> = map_mut(&mut programs, names::LISTENERS_MAP)?;
        for (index, socket) in [
            (listener::OUTBOUND, &target.outbound),
            (listener::INBOUND_PLAINTEXT, &target.inbound_plaintext),
            (listener::HBONE, &target.hbone),
            (listener::DNS_UDP, &target.dns_udp),
            (listener::DNS_TCP, &target.dns_tcp),
        ] {
            listeners
                .set(index, socket, 0)
                .map_err(|e| ebpf_error("adding a listener to the socket map", e))?;
        }

        // The inbound listeners' packets (and their accepted connections') go out by the main
        // table, not to the local delivery that catches the pod's own outbound TCP.
        for listener in [&target.inbound_plaintext, &target.hbone] {
            SockRef::from(listener)
                .set_mark(AGENT_MARK)
                .map_err(|e| ebpf_error("marking an inbound listener", e))?;
        }
        super::nftables::remove_table()?;
        routing::install(Steering::AllTcp { pod_ip }).map_err(CaptureError::Routing)?;
        let outbound: &mut SkLookup = program(&mut programs, names::OUTBOUND_PROGRAM)?;
        outbound
            .attach(&netns)
            .map_err(|e| ebpf_error("attaching the outbound program", e))?;

        // Subscribed before the interfaces are listed, the watcher hears of any added since.
        let subscription = links::Subscription::new()?;
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let watcher =
            links::Watcher::start(subscription, self.pods.clone(), netns.id(), generation)?;
        let mut capture = PodCapture {
            programs,
            interfaces: HashSet::new(),
            generation,
            sysctls: self.sysctls.clone(),
            _links: watcher,
        };
        // Under the lock, so that the watcher of a capture this one replaces cannot attach its
        // program in between.
        let mut pods = self.pods();
        capture.capture_interfaces()?;
        if let Some(replaced) = pods.insert(netns.id(), capture) {
            self.retire(&replaced.programs);
        }
        Ok(())
    }

    fn disable(&self) -> Result<(), CaptureError> {
        let netns = Netns::current().map_err(CaptureError::Netns)?;
        if let Some(capture) = self.pods().remove(&netns.id()) {
            self.retire(&capture.programs);
        }
        super::remove_all(&self.sysctls)
    }

    fn counters(&self) -> Option<CaptureCounters> {
        let mut total = *self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        for capture in self.pods().values() {
            add(&mut total, counted(&capture.programs));
        }
        Some(total)
    }
}

impl PodCapture {
    /// Captures every interface of the calling thread's namespace but loopback.
    fn capture_interfaces(&mut self) -> Result<(), CaptureError> {
        let inbound: &mut SchedClassifier = program(&mut self.programs, names::INBOUND_PROGRAM)?;
        for interface in interfaces()? {
            capture_interface(inbound, &self.sysctls, &interface.name)?;
            self.interfaces.insert(interface.index);
        }
        Ok(())
    }

    /// After a change of links: captures the interfaces again, logging those that are new. An
    /// interface that cannot be captured is tried again at the next change.
    fn capture_new_interfaces(&mut self, netns: NetnsId) {
        let (inbound, current) = match (
            program::<SchedClassifier>(&mut self.programs, names::INBOUND_PROGRAM),
            interfaces(),
        ) {
            (Ok(inbound), Ok(current)) => (inbound, current),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%netns, error = %chain(&error), "failed to capture the pod's new interfaces");
                return;
            }
        };
        self.interfaces
            .retain(|index| current.iter().any(|interface| interface.index == *index));
        for interface in current {
            // Where the program is attached already, it is replaced in place: an interface
            // removed and added again under the same index is captured too.
            match capture_interface(inbound, &self.sysctls, &interface.name) {
                Ok(()) => {
                    if self.interfaces.insert(interface.index) {
                        tracing::info!(%netns, interface = %interface.name, "captured a new interface of the pod");
                    }
                }
                Err(error) => {
                    self.interfaces.remove(&interface.index);
                    tracing::warn!(%netns, interface = %interface.name, error = %chain(&error), "failed to capture a new interface of the pod");
                }
            }
        }
    }
}

fn lock(pods: &Pods) -> MutexGuard<'_, HashMap<NetnsId, PodCapture>> {
    pods.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why the programs could not be loaded.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("the programs are not built in")]
    NotBuilt,
    #[error("{0}")]
    Kernel(String),
}

/// Loads one instance of the programs into the kernel, for the pod at `pod_ip`.
fn load(pod_ip: Ipv4Addr) -> Result<aya::Ebpf, LoadError> {
    if PROGRAMS.is_empty() {
        return Err(LoadError::NotBuilt);
    }
    let kernel = |what: &str, error: &dyn std::error::Error| {
        LoadError::Kernel(format!("{what}: {}", chain(error)))
    };
    let address = u32::from_ne_bytes(pod_ip.octets());
    let mut programs = EbpfLoader::new()
        .override_global(names::POD_IP_GLOBAL, &address, true)
        .load(PROGRAMS)
        .map_err(|e| kernel("loading the object", &e))?;
    let inbound: &mut SchedClassifier =
        program(&mut programs, names::INBOUND_PROGRAM).map_err(|e| kernel("", &e))?;
    inbound
        .load()
        .map_err(|e| kernel(names::INBOUND_PROGRAM, &e))?;
    let outbound: &mut SkLookup =
        program(&mut programs, names::OUTBOUND_PROGRAM).map_err(|e| kernel("", &e))?;
    outbound
        .load()
        .map_err(|e| kernel(names::OUTBOUND_PROGRAM, &e))?;
    Ok(programs)
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

/// What one pod's programs counted; zero where a counter cannot be read.
fn counted(programs: &aya::Ebpf) -> CaptureCounters {
    let Some(Ok(counters)) = programs
        .map(names::COUNTERS_MAP)
        .map(PerCpuArray::<&MapData, u64>::try_from)
    else {
        return CaptureCounters::default();
    };
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
