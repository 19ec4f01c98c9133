//! One pod's DNS server: its UDP socket and TCP listener, with the pod's limits. A pod that
//! floods the proxy only loses its own queries: each pod has its own rate, its own bound on
//! queries waiting for upstream, and its own bound on TCP connections.
//!
//! Over UDP, a reply must come from the address and port the pod sent its query to. A query
//! that nftables redirected arrives for the socket's own address, and conntrack translates the
//! reply back. One that eBPF steered arrives unchanged (`IP_PKTINFO` tells its destination):
//! its reply leaves from a socket bound to that server's address and port 53 in the pod
//! ([`ReplySockets`]), since a socket always answers from its own port.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics::Dropped;
use crate::{Client, Proxy, Transport};

/// The largest query read over UDP; a longer datagram is dropped.
const MAX_UDP_QUERY: usize = 4096;
/// How long a socket that failed (out of descriptors, of memory) rests before it is used again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The port DNS servers answer from.
const DNS_SERVER_PORT: u16 = 53;

/// The sockets of one pod's server, opened in the pod's namespace: a UDP socket with
/// `IP_PKTINFO` and a TCP listener, both non-blocking, and where replies to steered queries
/// leave from.
pub struct DnsSockets {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
    pub replies: Arc<dyn ReplySockets>,
}

impl std::fmt::Debug for DnsSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsSockets")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// A socket's future.
pub type ReplySocketFuture<'a> =
    Pin<Box<dyn Future<Output = io::Result<Arc<UdpSocket>>> + Send + 'a>>;

/// UDP sockets in the pod bound to a server's address (one the pod does not have), for the
/// replies to queries that capture steered to the proxy without translating them.
pub trait ReplySockets: Send + Sync + 'static {
    fn bound_to(&self, server: SocketAddrV4) -> ReplySocketFuture<'_>;
}

/// What one pod may ask of the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Queries per second, over UDP and TCP together; UDP queries beyond it are dropped, TCP
    /// ones wait.
    pub queries_per_second: u32,
    /// Queries the pod may send at once above its rate.
    pub burst: u32,
    /// Queries being answered at once; UDP queries beyond it are dropped.
    pub pending: usize,
    /// TCP connections open at once; those beyond it are closed.
    pub tcp_connections: usize,
    /// How long a TCP connection may stay idle.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queries_per_second: 5000,
            burst: 10_000,
            pending: 256,
            tcp_connections: 32,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Serves one pod until `stop` completes.
pub async fn serve(
    proxy: Arc<Proxy>,
    client: Arc<dyn Client>,
    sockets: DnsSockets,
    limits: Limits,
    stop: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let server = Arc::new(PodServer {
        proxy,
        client,
        limits,
        rate: Mutex::new(Bucket::new(limits)),
        pending: Arc::new(Semaphore::new(limits.pending)),
        connections: Arc::new(Semaphore::new(limits.tcp_connections)),
    });
    let udp = Arc::new(UdpSocket::from_std(sockets.udp)?);
    let tcp = TcpListener::from_std(sockets.tcp)?;
    let replies = sockets.replies;
    tokio::select! {
        () = stop => Ok(()),
        result = server.clone().serve_udp(udp, replies) => result,
        result = server.serve_tcp(tcp) => result,
    }
}

struct PodServer {
    proxy: Arc<Proxy>,
    client: Arc<dyn Client>,
    limits: Limits,
    rate: Mutex<Bucket>,
    pending: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl PodServer {
    async fn serve_udp(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        replies: Arc<dyn ReplySockets>,
    ) -> io::Result<()> {
        let own = socket.local_addr()?.ip();
        loop {
            let (query, peer, local) = match receive(&socket).await {
                Ok(Some(received)) => received,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "failed to receive a DNS query");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if !self.take_token() {
                self.proxy.metrics().dropped(Dropped::RateLimited);
                continue;
            }
            let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                self.proxy.metrics().dropped(Dropped::TooManyPending);
                continue;
            };
            let (server, socket, replies) = (self.clone(), socket.clone(), replies.clone());
            tokio::spawn(async move {
                let reply = server
                    .proxy
                    .answer(server.client.as_ref(), &query, Transport::Udp)
                    .await;
                if let Some(reply) = reply {
                    let sent = if std::net::IpAddr::V4(local) == own {
                        socket.send_to(&reply, peer).await
                    } else {
                        let from = SocketAddrV4::new(local, DNS_SERVER_PORT);
                        match replies.bound_to(from).await {
                            Ok(socket) => socket.send_to(&reply, peer).await,
                            Err(error) => Err(error),
                        }
                    };
                    if let Err(error) = sent {
                        tracing::debug!(%peer, %error, "failed to send a DNS reply");
                    }
                }
                drop(permit);
            });
        }
    }

    /// Accepts until stopped; the connections end with it (dropping the set aborts them).
    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors or memory, or the pod's connection failed: none of it
                    // is the listener's end.
                    tracing::warn!(%error, "failed to accept a DNS connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.proxy.metrics().dropped(Dropped::TooManyConnections);
                continue;
            };
            let server = self.clone();
            connections.spawn(async move {
                if let Err(error) = server.serve_connection(stream).await {
                    tracing::debug!(%error, "DNS over TCP connection ended");
                }
                drop(permit);
            });
        }
    }

    /// Length-prefixed queries, answered in turn, until the pod closes the connection or leaves
    /// it idle.
    async fn serve_connection(&self, mut stream: TcpStream) -> io::Result<()> {
        loop {
            let mut len = [0; 2];
            match tokio::time::timeout(self.limits.tcp_idle, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(error)) => return Err(error),
                Err(_) => return Ok(()),
            }
            let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
            tokio::time::timeout(self.limits.tcp_idle, stream.read_exact(&mut query))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query incomplete"))??;
            self.wait_for_token().await;
            let reply = self
                .proxy
                .answer(self.client.as_ref(), &query, Transport::Tcp)
                .await;
            let Some(reply) = reply else { continue };
            let Ok(reply_len) = u16::try_from(reply.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&reply_len.to_be_bytes());
            framed.extend_from_slice(&reply);
            // A pod that does not read holds its connection no longer than an idle one.
            tokio::time::timeout(self.limits.tcp_idle, stream.write_all(&framed))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply not read"))??;
        }
    }

    fn take_token(&self) -> bool {
        let mut rate = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
        rate.take(Instant::now()).is_none()
    }

    async fn wait_for_token(&self) {
        loop {
            let wait = {
                let mut rate = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
                rate.take(Instant::now())
            };
            match wait {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// A token bucket: `burst` queries at once, refilled at the pod's rate.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    updated: Instant,
}

impl Bucket {
    fn new(limits: Limits) -> Self {
        Self {
            tokens: f64::from(limits.burst),
            burst: f64::from(limits.burst.max(1)),
            per_second: f64::from(limits.queries_per_second.max(1)),
            updated: Instant::now(),
        }
    }

    /// Takes a token; `Some(wait)` when there is none, with how long until there is.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// One datagram, with who sent it and the address it was sent to; `None` for one to ignore
/// (too long, or not IPv4).
async fn receive(socket: &UdpSocket) -> io::Result<Option<(Vec<u8>, SocketAddrV4, Ipv4Addr)>> {
    socket
        .async_io(Interest::READABLE, || {
            // On the stack while the datagram is read: an idle pod's server holds no buffer.
            let mut buffer = [0; MAX_UDP_QUERY];
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let mut control = nix::cmsg_space!(libc::in_pktinfo);
            let message = nix::sys::socket::recvmsg::<SockaddrIn>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::MSG_TRUNC,
            )
            .map_err(io::Error::from)?;
            let local = message
                .cmsgs()
                .map_err(io::Error::from)?
                .find_map(|c| match c {
                    ControlMessageOwned::Ipv4PacketInfo(info) => {
                        Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
                    }
                    _ => None,
                });
            let truncated = message.flags.contains(MsgFlags::MSG_TRUNC);
            let (bytes, peer) = (message.bytes, message.address);
            Ok(match (peer, local) {
                (Some(peer), Some(local)) if !truncated => Some((
                    buffer[..bytes].to_vec(),
                    SocketAddrV4::new(peer.ip(), peer.port()),
                    local,
                )),
                _ => None,
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limits = Limits {
            queries_per_second: 10,
            burst: 3,
            ..Limits::default()
        };
        let mut bucket = Bucket::new(limits);
        let start = bucket.updated;
        for _ in 0..3 {
            assert_eq!(bucket.take(start), None);
        }
        let wait = bucket.take(start).unwrap();
        assert!(wait <= Duration::from_millis(100));
        assert_eq!(bucket.take(start + Duration::from_millis(100)), None);
    }
}
