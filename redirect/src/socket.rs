//! The sockets the agent opens inside a pod. Each is created by the calling thread, so in its
//! namespace: call these through [`PodNetns::run_here`](crate::PodNetns::run_here) (they do not
//! block) or [`PodNetns::run`](crate::PodNetns::run).
//!
//! The sockets that open connections carry [`AGENT_MARK`], which the capture rules let through
//! untouched. Listeners do not: a marked listener would mark its replies to a redirected
//! connection, and the rules would then route that connection's packets as the agent's own.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::sockopt;
use socket2::{Domain, SockRef, Socket, Type};

use crate::AGENT_MARK;

/// Connections queued per listener before the agent accepts them.
const BACKLOG: i32 = 1024;

/// A non-blocking listener on `addr`. A `transparent` one also accepts connections that capture
/// steered to it while addressed elsewhere.
pub fn listener(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(addr.ip(), transparent)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// An unconnected, non-blocking socket bound to `local`. A `transparent` one may bind an address
/// that is not the pod's own: the client's, so that the app sees who really connected.
pub fn connector(local: SocketAddr, transparent: bool) -> io::Result<std::net::TcpStream> {
    let socket = tcp_socket(local.ip(), transparent)?;
    socket.set_mark(AGENT_MARK)?;
    bind_for_connect(&socket, local)?;
    Ok(socket.into())
}

/// Binds a socket that is going to connect out to `local`. Port 0 leaves the port to `connect`,
/// which picks it for the destination (`IP_BIND_ADDRESS_NO_PORT`): a port `bind` picked would be
/// reserved against every destination, so one busy client address would run through the range,
/// ports in TIME_WAIT included, at a few hundred connections a second.
pub fn bind_for_connect(socket: impl AsFd, local: SocketAddr) -> io::Result<()> {
    if local.port() == 0 {
        nix::sys::socket::setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
    }
    SockRef::from(&socket).bind(&local.into())
}

/// Where a connection that capture steered to the agent was originally going. nftables'
/// REDIRECT (in the output hook) records it in conntrack and leaves a loopback address as the
/// connection's local one; eBPF steers no loopback destination and leaves the original
/// destination as the local address. Conntrack is asked only in the first case.
pub fn original_destination(stream: impl AsFd) -> io::Result<SocketAddr> {
    let socket = SockRef::from(&stream);
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "local address is not IP"))?;
    if !local.ip().is_loopback() {
        return Ok(local);
    }
    let original = if local.is_ipv6() {
        socket.original_dst_v6()
    } else {
        socket.original_dst_v4()
    };
    match original {
        Ok(original) => original.as_socket().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP")
        }),
        // No conntrack entry: the connection was not translated.
        Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(local),
        Err(error) => Err(error),
    }
}

/// The DNS proxy's sockets, UDP and TCP, on `127.0.0.1:port`: capture steers to them queries
/// addressed to any server. The UDP socket reports the address each datagram was sent to
/// (`IP_PKTINFO`); the TCP listener is transparent, as its connections keep the server's
/// address.
pub fn dns_sockets(port: u16) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let udp = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    udp.set_nonblocking(true)?;
    nix::sys::socket::setsockopt(&udp, sockopt::Ipv4PacketInfo, &true)?;
    udp.bind(&addr.into())?;
    Ok((udp.into(), listener(addr, true)?))
}

/// A UDP socket bound to `server`, an address the pod need not have (transparent), that the DNS
/// proxy answers from: a reply must come from where the query went. It shares the port with an
/// app's socket bound the same way (`SO_REUSEADDR`), and is never steered to: capture hands
/// queries to the proxy's own socket first.
pub fn dns_reply_socket(server: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(server), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    match server {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    socket.bind(&server.into())?;
    Ok(socket.into())
}

/// Non-blocking from its creation: two `fcntl` fewer per connection.
fn tcp_socket(ip: IpAddr, transparent: bool) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(SocketAddr::new(ip, 0)),
        Type::STREAM.nonblocking(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    if transparent {
        match ip {
            IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    Ok(socket)
}

/// The unspecified address of `ip`'s family with `port`: what listeners bind.
pub fn any(ip: IpAddr, port: u16) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        IpAddr::V6(_) => SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_non_blocking() {
        let listener = listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert!(SockRef::from(&listener).nonblocking().unwrap());
    }
}
