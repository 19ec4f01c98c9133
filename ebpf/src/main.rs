//! ambit's kernel programs, one instance per enrolled pod, loaded into the pod's network
//! namespace by the agent (`ambit-redirect`'s eBPF capture backend).
//!
//! - `ambit_inbound` (tc ingress on the pod's interfaces): a new IPv4 TCP connection to the pod
//!   is assigned to the agent's HBONE listener (port 15008) or its inbound plaintext listener
//!   (anything else). Without the listener (the agent is down) the SYN is dropped: inbound fails
//!   closed. IPv6 TCP is dropped, as the agent does not carry it yet. Kubelet's probes pass.
//! - `ambit_outbound` (sk_lookup on the pod's namespace): the pod's routing delivers its
//!   outbound TCP locally; a connection from the pod's address to any other is assigned to the
//!   agent's outbound listener, whose accepted socket keeps the original destination as its
//!   local address. Without the listener the connection is refused.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[expect(
    unsafe_code,
    reason = "the programs call kernel helpers and read their context through raw pointers"
)]
mod programs;

/// The programs only exist for the BPF target; a host build (`cargo check --workspace`) gets
/// this stub.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
