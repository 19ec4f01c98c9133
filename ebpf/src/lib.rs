//! ambit's kernel programs, in two objects that the agent (`ambit-redirect`'s eBPF capture
//! backend) loads differently:
//!
//! - `ambit-inbound`, loaded once per agent: `ambit_inbound`, at tc ingress of every captured
//!   pod's interfaces. A new IPv4 TCP connection to a pod is assigned to the agent's HBONE
//!   listener in that pod (port 15008) or its inbound plaintext listener (anything else), found
//!   in one socket hash by the packet's destination address. Without the listener (the agent is
//!   down, or the address is not a captured pod's) the SYN is dropped: inbound fails closed.
//!   IPv6 TCP is dropped, as the agent does not carry it yet. Kubelet's probes pass.
//! - `ambit-outbound`, one small instance per pod: `ambit_outbound`, sk_lookup on the pod's
//!   namespace, with the pod's address and its own socket map. The pod's routing delivers its
//!   outbound TCP (and DNS) locally; a connection from the pod's address to any other is
//!   assigned to the agent's outbound listener, whose accepted socket keeps the original
//!   destination as its local address. Without the listener the connection is refused.
//!
//! Why the outbound program is not shared as well: sk_lookup sees only addresses and ports, and
//! those do not tell which pod's namespace the lookup runs in. The agent's own inbound
//! connections to a pod's app leave from the client's address, which may be another enrolled
//! pod's: a shared program keyed by address would steer them to that other pod's listener.
//!
//! This library holds what both objects share.

#![cfg_attr(target_arch = "bpf", no_std)]

#[cfg(target_arch = "bpf")]
#[expect(
    unsafe_code,
    reason = "a per-CPU counter is written through a raw pointer, and a panic handler is needed"
)]
mod kernel;

#[cfg(target_arch = "bpf")]
pub use kernel::count;
