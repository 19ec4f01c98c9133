//! The programs themselves; see the crate's documentation.

use core::ffi::c_void;

use ambit_ebpf_common::{KUBELET_PROBE_SOURCE, counter, listener};
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT, sk_action};
use aya_ebpf::helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release};
use aya_ebpf::macros::{classifier, map, sk_lookup};
use aya_ebpf::maps::{PerCpuArray, SockMap};
use aya_ebpf::programs::{SkLookupContext, TcContext};

const ETH_HEADER: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u32 = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const HBONE_PORT: u16 = ambit_ebpf_common::HBONE_PORT;

/// The pod's IPv4 address as the kernel stores it; set by the agent when it loads the programs.
#[unsafe(no_mangle)]
static AMBIT_POD_IP: u32 = 0;

/// The agent's listeners in the pod, by `listener::*` index.
#[map]
static AMBIT_LISTENERS: SockMap = SockMap::with_max_entries(listener::COUNT, 0);

/// What the programs did, by `counter::*` index.
#[map]
static AMBIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[classifier]
fn ambit_inbound(ctx: TcContext) -> i32 {
    match inbound(&ctx) {
        Ok(action) => action,
        // A packet too short to parse is not a connection to steer.
        Err(()) => TC_ACT_OK,
    }
}

fn inbound(ctx: &TcContext) -> Result<i32, ()> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if ether_type == ETH_P_IPV6 {
        let next_header = ctx.load::<u8>(ETH_HEADER + 6).map_err(|_| ())?;
        return Ok(if next_header == IPPROTO_TCP {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        });
    }
    if ether_type != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let version_ihl = ctx.load::<u8>(ETH_HEADER).map_err(|_| ())?;
    let protocol = ctx.load::<u8>(ETH_HEADER + 9).map_err(|_| ())?;
    let source = ctx.load::<u32>(ETH_HEADER + 12).map_err(|_| ())?;
    let destination = ctx.load::<u32>(ETH_HEADER + 16).map_err(|_| ())?;
    if protocol != IPPROTO_TCP
        || destination != pod_ip()
        || source == u32::from_ne_bytes(KUBELET_PROBE_SOURCE)
    {
        return Ok(TC_ACT_OK);
    }
    let tcp = ETH_HEADER + usize::from(version_ihl & 0x0f) * 4;
    let port = u16::from_be(ctx.load::<u16>(tcp + 2).map_err(|_| ())?);
    let flags = ctx.load::<u8>(tcp + 13).map_err(|_| ())?;
    // Only a new connection is steered; the rest of it finds its socket by its addresses.
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(TC_ACT_OK);
    }
    let index = if port == HBONE_PORT {
        listener::HBONE
    } else {
        listener::INBOUND_PLAINTEXT
    };
    if assign(ctx.skb.skb.cast(), index) {
        count(counter::INBOUND_STEERED);
        Ok(TC_ACT_OK)
    } else {
        count(counter::INBOUND_DROPPED);
        Ok(TC_ACT_SHOT)
    }
}

#[sk_lookup]
fn ambit_outbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup` for its whole run.
    let lookup = unsafe { &*ctx.lookup };
    let pod = pod_ip();
    let outbound = lookup.family == AF_INET
        && lookup.protocol == u32::from(IPPROTO_TCP)
        && lookup.remote_ip4 == pod
        && lookup.local_ip4 != pod
        && lookup.local_ip4.to_ne_bytes()[0] != 127;
    if !outbound {
        return sk_action::SK_PASS;
    }
    if AMBIT_LISTENERS
        .redirect_sk_lookup(&ctx, listener::OUTBOUND, 0)
        .is_ok()
    {
        count(counter::OUTBOUND_STEERED);
        sk_action::SK_PASS
    } else {
        count(counter::OUTBOUND_DROPPED);
        sk_action::SK_DROP
    }
}

/// Assigns the packet to the listener at `index`; false when there is none.
fn assign(skb: *mut c_void, index: u32) -> bool {
    let map = core::ptr::addr_of!(AMBIT_LISTENERS).cast_mut().cast();
    // SAFETY: a lookup in a socket map returns a referenced socket or null; a socket is
    // released below on every path.
    let socket = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if socket.is_null() {
        return false;
    }
    // SAFETY: `skb` is the program's context and `socket` a referenced socket.
    let assigned = unsafe { bpf_sk_assign(skb, socket, 0) };
    // SAFETY: `socket` came from the lookup above and is released once.
    unsafe { bpf_sk_release(socket) };
    assigned == 0
}

fn pod_ip() -> u32 {
    // SAFETY: a read of a global the loader set; volatile, so the compiler does not fold it to
    // its initial value.
    unsafe { core::ptr::read_volatile(&AMBIT_POD_IP) }
}

fn count(index: u32) {
    if let Some(counter) = AMBIT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
