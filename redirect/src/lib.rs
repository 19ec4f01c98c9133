//! Getting pod traffic to the agent: pod network namespaces, the sockets the agent opens inside
//! them, and the capture backends (eBPF, nftables) that steer a pod's TCP to those sockets.
//!
//! For now it publishes the ports and marks that capture is built on; the capture backends
//! follow.

pub use ambit_ebpf_common::{
    AGENT_MARK, AGENT_POD_PORTS, DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_MASK,
    OUTBOUND_PORT, REPLY_MARK,
};
