//! TCP handshakes made by hand with a raw socket: a SYN split into two IPv4 fragments so that
//! the TCP flags are only in the second (what a classifier that reads one packet at a time cannot
//! see), and a handshake whose final ACK finds a socket by itself (what a classifier that steers
//! only SYNs does not see).

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ambit_agent::lab::topology::Topology;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const MORE_FRAGMENTS: u16 = 0x2000;
const TCP: u8 = 6;

/// Stops the kernel of `netns` from resetting the handshakes made here: it knows no socket for
/// them. The table goes with the namespace.
pub(crate) fn drop_resets(netns: &str) {
    let rules = "table ip ambit_raw_handshake {
        chain output { type filter hook output priority 0; tcp flags & rst == rst drop; }
    }";
    let mut nft = Topology::command_in(netns, "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft is installed");
    io::Write::write_all(&mut nft.stdin.take().expect("piped"), rules.as_bytes())
        .expect("nft reads its rules");
    assert!(
        nft.wait().expect("nft ran").success(),
        "nft refused the rules"
    );
}

/// How the SYN of a hand-made handshake is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syn {
    Whole,
    InFragments,
}

/// Sends a SYN from `source` to `target` and, if a SYN-ACK comes back, completes the handshake;
/// tells whether it did. Runs in the client's namespace.
pub(crate) fn connect(source: IpAddr, target: SocketAddr, sent: Syn) -> io::Result<bool> {
    let (IpAddr::V4(source), SocketAddr::V4(target)) = (source, target) else {
        return Err(io::Error::other("IPv4 only"));
    };
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    socket.set_header_included_v4(true)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let pid = std::process::id();
    let local = SocketAddrV4::new(source, 40_000 + (pid % 20_000) as u16);
    let to = SockAddr::from(SocketAddr::V4(target));
    let id = pid as u16;
    let isn = pid.wrapping_mul(2_654_435_761);

    let syn = tcp_segment(local, target, (isn, 0), SYN);
    match sent {
        Syn::Whole => {
            socket.send_to(&ipv4(local, target, id, 0, &syn), &to)?;
        }
        Syn::InFragments => {
            socket.send_to(&ipv4(local, target, id, MORE_FRAGMENTS, &syn[..8]), &to)?;
            socket.send_to(&ipv4(local, target, id, 1, &syn[8..]), &to)?;
        }
    }
    let Some(their_isn) = syn_ack(&socket, local, target)? else {
        return Ok(false);
    };
    let ack = tcp_segment(
        local,
        target,
        (isn.wrapping_add(1), their_isn.wrapping_add(1)),
        ACK,
    );
    socket.send_to(&ipv4(local, target, id.wrapping_add(1), 0, &ack), &to)?;
    Ok(true)
}

/// The sequence number of the SYN-ACK `target` answers `local` with, if one comes.
fn syn_ack(socket: &Socket, local: SocketAddrV4, target: SocketAddrV4) -> io::Result<Option<u32>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut packet = [0; 1500];
    while Instant::now() < deadline {
        let length = match (&*socket).read(&mut packet) {
            Ok(length) => length,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(error) => return Err(error),
        };
        let packet = &packet[..length];
        let header = usize::from(packet[0] & 0x0f) * 4;
        let Some(tcp) = packet.get(header..header + 20) else {
            continue;
        };
        let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let ports = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        if from == *target.ip()
            && ports == (target.port(), local.port())
            && tcp[13] & (SYN | ACK) == SYN | ACK
        {
            return Ok(Some(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]])));
        }
    }
    Ok(None)
}

/// A 20-byte TCP header without options or payload, with its checksum.
fn tcp_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    (seq, ack): (u32, u32),
    flags: u8,
) -> [u8; 20] {
    let mut segment = [0; 20];
    segment[0..2].copy_from_slice(&from.port().to_be_bytes());
    segment[2..4].copy_from_slice(&to.port().to_be_bytes());
    segment[4..8].copy_from_slice(&seq.to_be_bytes());
    segment[8..12].copy_from_slice(&ack.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = flags;
    segment[14..16].copy_from_slice(&65_535u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, TCP, 0, 20]);
    pseudo.extend_from_slice(&segment);
    segment[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    segment
}

/// An IPv4 packet carrying `payload`; `fragment` holds the flags and the offset (in 8-byte
/// units). The kernel fills in the length and the header checksum.
fn ipv4(from: SocketAddrV4, to: SocketAddrV4, id: u16, fragment: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x45, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&fragment.to_be_bytes());
    packet.extend_from_slice(&[64, TCP, 0, 0]);
    packet.extend_from_slice(&from.ip().octets());
    packet.extend_from_slice(&to.ip().octets());
    packet.extend_from_slice(payload);
    packet
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
