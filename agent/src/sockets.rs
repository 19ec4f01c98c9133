//! Where the proxies' outgoing sockets come from: the seam between the data path and the pod
//! network namespaces.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use ambit_redirect::PodNetns;
use tokio::net::{TcpSocket, TcpStream};

/// The future a [`SocketFactory`] returns.
pub type SocketFuture<'a> = Pin<Box<dyn Future<Output = io::Result<TcpSocket>> + Send + 'a>>;

/// Creates the sockets a proxy connects out with, bound to `local` (port 0 for any). A
/// `transparent` socket may bind an address that is not local, such as the original client's.
pub trait SocketFactory: Send + Sync + fmt::Debug + 'static {
    fn connector(&self, local: SocketAddr, transparent: bool) -> SocketFuture<'_>;
}

/// How long a proxy waits for an app or an upstream outside the mesh to accept a connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `destination` from a socket of `sockets` bound to `local`, within
/// [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(
    sockets: &dyn SocketFactory,
    local: SocketAddr,
    transparent: bool,
    destination: SocketAddr,
) -> io::Result<TcpStream> {
    let connect = async {
        sockets
            .connector(local, transparent)
            .await?
            .connect(destination)
            .await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{destination} did not accept the connection within {CONNECT_TIMEOUT:?}"),
            ))
        })
}

/// Makes closing `tcp` reset it: the peer sees an error rather than an end of stream, and
/// this side keeps no TIME_WAIT.
pub(crate) fn reset_on_close(tcp: &TcpStream) {
    // Failing leaves a graceful close, which is all a closed socket can do anyway.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Whether a failed connect is the destination's fault: nothing listens, or nothing answers.
pub(crate) fn is_unreachable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::ConnectionReset
    )
}

/// Sockets in the agent's own namespace, without marks: for tests and tools that run HBONE
/// outside any pod. `transparent` is ignored, so `local` must be an address of this host.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSockets;

impl SocketFactory for LocalSockets {
    fn connector(&self, local: SocketAddr, _transparent: bool) -> SocketFuture<'_> {
        Box::pin(async move {
            let socket = if local.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_nodelay(true)?;
            ambit_redirect::socket::bind_for_connect(&socket, local)?;
            Ok(socket)
        })
    }
}

/// Sockets inside a pod's namespace, marked so that capture lets them through.
#[derive(Debug, Clone)]
pub struct PodSockets(pub PodNetns);

impl SocketFactory for PodSockets {
    fn connector(&self, local: SocketAddr, transparent: bool) -> SocketFuture<'_> {
        Box::pin(async move {
            let socket = self
                .0
                .run_here(|| ambit_redirect::socket::connector(local, transparent))
                .map_err(io::Error::other)??;
            Ok(TcpSocket::from_std_stream(socket))
        })
    }
}
