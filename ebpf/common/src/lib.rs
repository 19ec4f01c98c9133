//! What ambit's kernel programs and its user space must agree on: the ports of the agent's
//! sockets inside each pod and the packet marks that keep the agent's own traffic out of
//! capture. `no_std`, so the eBPF programs can use it.

#![no_std]

/// Outbound capture: the pod's outgoing TCP is steered here.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture: TCP to the pod from outside the mesh.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE: mTLS from other mesh nodes.
pub const HBONE_PORT: u16 = 15008;
/// DNS proxy.
pub const DNS_PORT: u16 = 15053;
/// DNS, to whatever server: a pod's queries on this port go to the DNS proxy.
pub const CAPTURED_DNS_PORT: u16 = 53;

/// The ports of the agent's own sockets in a pod: never a valid destination for a tunnel.
pub const AGENT_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

/// `SO_MARK` on every socket the agent opens in a pod, so that its traffic is not captured again.
pub const AGENT_MARK: u32 = 0x539;
/// The bits of the mark that ambit owns.
pub const MARK_MASK: u32 = 0xfff;
/// fwmark/connmark routing replies to spoofed-source connections back to the agent.
pub const REPLY_MARK: u32 = 0x111;
/// connmark of the inbound flows that nftables capture hands to the agent.
pub const CAPTURED_MARK: u32 = 0x222;

/// The agent's listeners in a pod, by the index the eBPF programs find them under: in the
/// outbound program's socket map of the pod (`OUTBOUND`, `DNS_UDP`, `DNS_TCP`), and, through
/// [`listener_key`], in the inbound program's socket hash of every pod (`INBOUND_PLAINTEXT`,
/// `HBONE`).
pub mod listener {
    /// 15001: connections the pod's apps open.
    pub const OUTBOUND: u32 = 0;
    /// 15006: plaintext into the pod.
    pub const INBOUND_PLAINTEXT: u32 = 1;
    /// 15008: HBONE into the pod.
    pub const HBONE: u32 = 2;
    /// 15053, UDP: the pod's DNS queries.
    pub const DNS_UDP: u32 = 3;
    /// 15053, TCP: the pod's DNS queries.
    pub const DNS_TCP: u32 = 4;
    /// Entries in the outbound program's map.
    pub const COUNT: u32 = 5;
    /// Entries per pod in the inbound program's socket hash.
    pub const INBOUND_PER_POD: u32 = 2;
}

/// The pods one agent captures at most with eBPF: the inbound program's socket hash has room
/// for their listeners.
pub const MAX_CAPTURED_PODS: u32 = 2048;

/// The key of a pod's inbound `listener` in the inbound program's socket hash: the pod's IPv4
/// address, as its octets, and the listener's index.
pub const fn listener_key(pod_ip: [u8; 4], listener: u32) -> u64 {
    (u32::from_be_bytes(pod_ip) as u64) << 32 | listener as u64
}

/// The eBPF programs' counters, by index in their per-CPU arrays: the inbound object counts the
/// `INBOUND_*` ones, each pod's outbound object the `OUTBOUND_*` ones.
pub mod counter {
    /// New inbound connections handed to the agent's listeners.
    pub const INBOUND_STEERED: u32 = 0;
    /// New inbound connections dropped because no listener was there: the agent is down, or
    /// the destination is not the address of the pod it captured.
    pub const INBOUND_DROPPED: u32 = 1;
    /// New outbound connections handed to the outbound listener.
    pub const OUTBOUND_STEERED: u32 = 2;
    /// New outbound connections refused because no listener was there.
    pub const OUTBOUND_DROPPED: u32 = 3;
    /// TCP packets to the pod dropped because they cannot be classified: IPv4 fragments,
    /// malformed or truncated headers.
    pub const INBOUND_UNCLASSIFIED: u32 = 4;
    /// Entries in the array.
    pub const COUNT: u32 = 5;
}

/// Kubernetes nodes send kubelet's probes from this address; capture leaves them alone.
pub const KUBELET_PROBE_SOURCE: [u8; 4] = [169, 254, 7, 127];

/// The names the agent finds the programs and maps by: the programs' functions and statics
/// carry exactly these names.
pub mod names {
    pub const INBOUND_PROGRAM: &str = "ambit_inbound";
    pub const OUTBOUND_PROGRAM: &str = "ambit_outbound";
    /// The inbound object's socket hash.
    pub const INBOUND_LISTENERS_MAP: &str = "AMBIT_INBOUND_LISTENERS";
    /// The outbound object's socket map.
    pub const POD_LISTENERS_MAP: &str = "AMBIT_POD_LISTENERS";
    /// Both objects have their counters.
    pub const COUNTERS_MAP: &str = "AMBIT_COUNTERS";
    /// The outbound object's one-entry array of the pod's IPv4 address, as the kernel stores
    /// it (network order in memory).
    pub const POD_IP_MAP: &str = "AMBIT_POD_IP";
}
