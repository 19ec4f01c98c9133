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

/// The ports of the agent's own sockets in a pod: never a valid destination for a tunnel.
pub const AGENT_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

/// `SO_MARK` on every socket the agent opens in a pod, so that its traffic is not captured again.
pub const AGENT_MARK: u32 = 0x539;
/// The bits of the mark that ambit owns.
pub const MARK_MASK: u32 = 0xfff;
/// fwmark/connmark routing replies to spoofed-source connections back to the agent.
pub const REPLY_MARK: u32 = 0x111;
