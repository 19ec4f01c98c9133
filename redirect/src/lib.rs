//! Getting pod traffic to the agent: pod network namespaces ([`Netns`], [`PodNetns`], found
//! through a pod's processes with [`HostProc`]), the sockets the agent opens inside them
//! ([`socket`]), and the capture backends that steer a pod's TCP and DNS to those sockets
//! ([`CaptureBackend`]: [`Ebpf`], [`Nftables`]), with the policy routing they rely on and the
//! pods' sysctls they set ([`NetSysctls`]).
//!
//! Everything that must happen inside a pod's namespace runs through its [`PodNetns`], on a
//! thread that enters the namespace for that work only; the rest of the agent stays in the
//! node's namespace.

mod capture;
mod netns;
mod routing;
pub mod socket;

pub use ambit_ebpf_common::{
    AGENT_MARK, AGENT_POD_PORTS, CAPTURED_DNS_PORT, CAPTURED_MARK, DNS_PORT, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, KUBELET_PROBE_SOURCE, MARK_MASK, OUTBOUND_PORT, REPLY_MARK,
};
pub use capture::{
    CaptureBackend, CaptureCounters, CaptureError, CaptureTarget, Ebpf, EbpfUnavailable,
    NetSysctls, Nftables,
};
pub use netns::{HostProc, Netns, NetnsError, NetnsId, PodNetns, PodNetnsError, PodProcesses};
pub use routing::RoutingError;
