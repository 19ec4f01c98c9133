//! `ambit_outbound`; see the crate's documentation.

use ambit_ebpf::count;
use ambit_ebpf_common::{CAPTURED_DNS_PORT, counter, listener};
use aya_ebpf::bindings::sk_action;
use aya_ebpf::macros::{map, sk_lookup};
use aya_ebpf::maps::{Array, PerCpuArray, SockMap};
use aya_ebpf::programs::SkLookupContext;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_INET: u32 = 2;

/// The pod's IPv4 address as the kernel stores it, at index 0; set by the agent before it
/// attaches the program. (A map, not a global: then every pod's instance loads from the same
/// object, with the same loader.)
#[map]
static AMBIT_POD_IP: Array<u32> = Array::with_max_entries(1, 0);

/// The agent's listeners in the pod that this program steers to, by `listener::*` index.
#[map]
static AMBIT_POD_LISTENERS: SockMap = SockMap::with_max_entries(listener::COUNT, 0);

/// What the program did, by `counter::*` index.
#[map]
static AMBIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[sk_lookup]
fn ambit_outbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup` for its whole run.
    let lookup = unsafe { &*ctx.lookup };
    // Always there (a one-entry array); the verifier wants the check. Failing closed all the
    // same.
    let Some(&pod) = AMBIT_POD_IP.get(0) else {
        return sk_action::SK_DROP;
    };
    let from_pod = lookup.family == AF_INET
        && lookup.remote_ip4 == pod
        && lookup.local_ip4 != pod
        && lookup.local_ip4.to_ne_bytes()[0] != 127;
    if !from_pod {
        return sk_action::SK_PASS;
    }
    // In host byte order, unlike the remote port.
    let dns = lookup.local_port == u32::from(CAPTURED_DNS_PORT);
    let index = match (lookup.protocol, dns) {
        (IPPROTO_TCP, false) => listener::OUTBOUND,
        (IPPROTO_TCP, true) => listener::DNS_TCP,
        // Routing delivers the pod's UDP locally only for DNS.
        (IPPROTO_UDP, true) => listener::DNS_UDP,
        _ => return sk_action::SK_PASS,
    };
    let steered = AMBIT_POD_LISTENERS
        .redirect_sk_lookup(&ctx, index, 0)
        .is_ok();
    // Datagrams are not connections: the counters count TCP.
    if lookup.protocol == IPPROTO_TCP {
        let counted = if steered {
            counter::OUTBOUND_STEERED
        } else {
            counter::OUTBOUND_DROPPED
        };
        count(&AMBIT_COUNTERS, counted);
    }
    if steered {
        sk_action::SK_PASS
    } else {
        sk_action::SK_DROP
    }
}
