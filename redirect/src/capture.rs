//! Capture backends: what steers a pod's TCP, and its DNS, to the agent's sockets inside it.
//!
//! Both backends clean up after each other: enabling one, disabling either, removes whatever
//! either left in the pod (an nftables table, tc filters, routing rules), so that the agent can
//! switch backends across restarts and a pod never carries two captures.

mod ebpf;
mod nftables;
mod sysctls;

pub use ebpf::{Ebpf, EbpfUnavailable};
pub use nftables::Nftables;
pub use sysctls::NetSysctls;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::netns::NetnsError;
use crate::routing::{self, RoutingError};

/// Why capture could not be switched on or off for a pod.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("failed to run nft")]
    RunNft(#[source] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Nft(String),
    #[error("failed to set up policy routing")]
    Routing(#[source] RoutingError),
    #[error("failed to reach the pod's network namespace")]
    Netns(#[source] NetnsError),
    #[error("eBPF capture failed: {0}")]
    Ebpf(String),
    #[error("failed to subscribe to the pod's link notifications")]
    SubscribeToLinks(#[source] nix::Error),
    #[error("failed to start watching the pod's links")]
    StartLinkWatcher(#[source] std::io::Error),
    #[error("eBPF capture supports IPv4 pods only, not {0}")]
    Ipv6Pod(IpAddr),
    #[error("failed to write {}{}", .path.display(), sysctls::hint(.source))]
    WriteSysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What capture steers a pod's TCP to: the pod's address and the agent's listeners in it.
/// The descriptors are the agent's own (duplicated); capture may keep references to the sockets.
#[derive(Debug)]
pub struct CaptureTarget {
    pub pod_ip: IpAddr,
    /// 15001.
    pub outbound: OwnedFd,
    /// 15006.
    pub inbound_plaintext: OwnedFd,
    /// 15008.
    pub hbone: OwnedFd,
    /// 15053, UDP: the DNS proxy.
    pub dns_udp: OwnedFd,
    /// 15053, TCP: the DNS proxy.
    pub dns_tcp: OwnedFd,
}

/// What a backend's kernel programs counted, over every pod it captured since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureCounters {
    /// New inbound connections handed to the agent.
    pub inbound_steered: u64,
    /// New inbound connections dropped for want of a listener.
    pub inbound_dropped: u64,
    /// TCP packets to the pod dropped because they could not be classified (IPv4 fragments,
    /// malformed headers).
    pub inbound_unclassified: u64,
    /// New outbound connections handed to the agent.
    pub outbound_steered: u64,
    /// New outbound connections refused for want of a listener.
    pub outbound_dropped: u64,
}

/// A way of capturing a pod's traffic. `enable`, `disable` and `is_enabled` run inside the
/// pod's namespace (through [`PodNetns::run`](crate::PodNetns::run)), are idempotent, and replace
/// whatever an earlier run of the agent left behind, with either backend.
pub trait CaptureBackend: Send + Sync + std::fmt::Debug + 'static {
    /// `ebpf` or `nftables`, as `--redirect` names it.
    fn name(&self) -> &'static str;

    /// Starts capturing: from now on the pod's TCP goes to the agent's sockets, or nowhere.
    fn enable(&self, target: &CaptureTarget) -> Result<(), CaptureError>;

    /// Stops capturing and removes every trace of it.
    fn disable(&self) -> Result<(), CaptureError>;

    /// Whether any capture is active in the calling thread's namespace.
    fn is_enabled(&self) -> Result<bool, CaptureError> {
        Ok(nftables::table_exists()? || routing::any_installed().map_err(CaptureError::Routing)?)
    }

    /// Stops maintaining the pods' capture and lets go of what the agent holds for it, leaving
    /// it in place: another agent has replaced (or is replacing) it in every pod.
    fn relinquish(&self) {}

    /// What the backend's kernel programs counted; `None` for a backend without programs.
    fn counters(&self) -> Option<CaptureCounters> {
        None
    }
}

/// Removes every capture of either backend from the calling thread's namespace.
fn remove_all(sysctls: &NetSysctls) -> Result<(), CaptureError> {
    nftables::remove_table()?;
    ebpf::detach_filters(sysctls)?;
    routing::remove().map_err(CaptureError::Routing)
}
