//! `ambit_inbound`; see the crate's documentation.

use core::ffi::c_void;
use core::mem::MaybeUninit;

use ambit_ebpf::count;
use ambit_ebpf_common::{KUBELET_PROBE_SOURCE, MAX_CAPTURED_PODS, counter, listener, listener_key};
use aya_ebpf::bindings::bpf_hdr_start_off::BPF_HDR_START_NET;
use aya_ebpf::bindings::{
    BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple,
    bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
};
use aya_ebpf::helpers::{
    bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skb_load_bytes_relative,
    bpf_skc_lookup_tcp,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{PerCpuArray, SockHash};
use aya_ebpf::programs::TcContext;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HEADER: usize = 20;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DESTINATION: u8 = 60;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;
const HBONE_PORT: u16 = ambit_ebpf_common::HBONE_PORT;

/// The agent's inbound listeners in every captured pod, by [`listener_key`] of the pod's address
/// and `listener::INBOUND_PLAINTEXT` or `listener::HBONE`.
#[map]
static AMBIT_INBOUND_LISTENERS: SockHash<u64> =
    SockHash::with_max_entries(MAX_CAPTURED_PODS * listener::INBOUND_PER_POD, 0);

/// What the program did, by `counter::*` index.
#[map]
static AMBIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[classifier]
fn ambit_inbound(ctx: TcContext) -> i32 {
    // By the packet's protocol, not an Ethernet header: interfaces without one (tunnels, L3
    // devices) start at the network header.
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => ipv4(&ctx),
        ETH_P_IPV6 => ipv6(&ctx),
        _ => TC_ACT_OK,
    }
}

/// Steers a new TCP connection into the pod to the agent's listener for the pod's address. One
/// to another address of the pod has no listener and is dropped, as is TCP that cannot be
/// classified (a fragment, whose reassembly would bypass this program, or a malformed header):
/// capture fails closed. The kernel assigns only a socket of the packet's own namespace, so a
/// packet that reaches a pod for another pod's address finds no listener either.
fn ipv4(ctx: &TcContext) -> i32 {
    let Ok(header) = load::<[u8; IPV4_HEADER]>(ctx, 0) else {
        // Too short to be addressed to anyone.
        return TC_ACT_SHOT;
    };
    let source = [header[12], header[13], header[14], header[15]];
    let destination = [header[16], header[17], header[18], header[19]];
    if header[9] != IPPROTO_TCP || source == KUBELET_PROBE_SOURCE {
        return TC_ACT_OK;
    }
    let header_length = usize::from(header[0] & 0x0f) * 4;
    let fragment = u16::from_be_bytes([header[6], header[7]]) & (IP_MORE_FRAGMENTS | IP_OFFSET);
    if header_length < IPV4_HEADER || fragment != 0 {
        return unclassified();
    }
    let (Ok(ports), Ok(flags)) = (
        load::<[u8; 4]>(ctx, header_length),
        load::<u8>(ctx, header_length + 13),
    ) else {
        return unclassified();
    };
    // A new connection is steered; the rest of one finds its socket by its addresses. An ACK
    // that only a listener would take completes a handshake without the agent (SYN cookies,
    // which are valid at any listener of the pod): it goes to the agent too.
    let steer = match flags & (TCP_SYN | TCP_ACK | TCP_RST) {
        TCP_SYN => true,
        TCP_ACK => only_a_listener_takes(ctx, &header, ports),
        _ => false,
    };
    if !steer {
        return TC_ACT_OK;
    }
    let index = if u16::from_be_bytes([ports[2], ports[3]]) == HBONE_PORT {
        listener::HBONE
    } else {
        listener::INBOUND_PLAINTEXT
    };
    if assign(ctx.skb.skb.cast(), listener_key(destination, index)) {
        count(&AMBIT_COUNTERS, counter::INBOUND_STEERED);
        TC_ACT_OK
    } else {
        count(&AMBIT_COUNTERS, counter::INBOUND_DROPPED);
        TC_ACT_SHOT
    }
}

/// Whether the socket the kernel would hand this packet to is a listener: no connection of
/// the pod has its addresses.
fn only_a_listener_takes(ctx: &TcContext, header: &[u8; IPV4_HEADER], ports: [u8; 4]) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
                daddr: u32::from_ne_bytes([header[16], header[17], header[18], header[19]]),
                sport: u16::from_ne_bytes([ports[0], ports[1]]),
                dport: u16::from_ne_bytes([ports[2], ports[3]]),
            },
        },
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: `tuple` is an IPv4 tuple of `size` bytes; a socket found is released below.
    let socket = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if socket.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, readable until released.
    let listening = unsafe { (*socket).state } == BPF_TCP_LISTEN;
    // SAFETY: `socket` came from the lookup above and is released once.
    unsafe { bpf_sk_release(socket.cast()) };
    listening
}

/// Pods are captured over IPv4 only: IPv6 TCP, and what could hide it (extension headers,
/// fragments), is dropped; ICMPv6 and the rest pass.
fn ipv6(ctx: &TcContext) -> i32 {
    match load::<u8>(ctx, 6) {
        Ok(IPPROTO_TCP | IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DESTINATION) => {
            TC_ACT_SHOT
        }
        Ok(_) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

fn unclassified() -> i32 {
    count(&AMBIT_COUNTERS, counter::INBOUND_UNCLASSIFIED);
    TC_ACT_SHOT
}

/// Reads a `T` at `offset` from the start of the network header.
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    let mut value = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes at most `size_of::<T>()` bytes into `value`, and returns 0
    // only when it wrote all of them.
    let loaded = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast(),
            offset as u32,
            value.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    if loaded == 0 {
        // SAFETY: fully written, above; `T` is plain bytes.
        Ok(unsafe { value.assume_init() })
    } else {
        Err(())
    }
}

/// Assigns the packet to the listener under `key`; false when there is none, or when it is not
/// in the packet's namespace.
fn assign(skb: *mut c_void, key: u64) -> bool {
    let map = core::ptr::addr_of!(AMBIT_INBOUND_LISTENERS)
        .cast_mut()
        .cast();
    // SAFETY: a lookup in a socket hash returns a referenced socket or null; a socket is
    // released below on every path.
    let socket = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&key).cast()) };
    if socket.is_null() {
        return false;
    }
    // SAFETY: `skb` is the program's context and `socket` a referenced socket.
    let assigned = unsafe { bpf_sk_assign(skb, socket, 0) };
    // SAFETY: `socket` came from the lookup above and is released once.
    unsafe { bpf_sk_release(socket) };
    assigned == 0
}
