//! Apps inside pods: sockets created in a pod's namespace, used from the caller's runtime.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ambit_redirect::{Netns, NetnsError, PodNetns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// How long an app waits for a connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on a namespace for creating app sockets in it. App sockets carry no mark: capture
/// treats them as the pod's own traffic.
#[derive(Debug, Clone)]
pub struct InPod(PodNetns);

impl InPod {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        Ok(Self(PodNetns::enter(Netns::open(path)?)?))
    }

    /// Runs blocking work inside the namespace.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<R> {
        self.0.run(f).await.map_err(io::Error::other)
    }

    pub async fn listen(&self, port: u16) -> io::Result<TcpListener> {
        let listener = self
            .run(move || {
                let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
                listener.set_nonblocking(true)?;
                Ok::<_, io::Error>(listener)
            })
            .await??;
        TcpListener::from_std(listener)
    }

    /// Connects from the pod, as one of its apps would. The socket is made in the pod and
    /// connects from the caller's runtime, so a connection that is dropped ties up no thread.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = self
            .0
            .run_here(|| match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            })
            .map_err(io::Error::other)??;
        socket.set_nodelay(true)?;
        tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}")))?
    }

    /// A server that answers every connection with the address it sees the client at, one
    /// line, then echoes.
    pub async fn echo(&self, port: u16) -> io::Result<EchoApp> {
        let listener = self.listen(port).await?;
        let accepted = Arc::new(Mutex::new(HashMap::new()));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                *lock(&counter).entry(peer.ip()).or_default() += 1;
                tokio::spawn(echo(stream, peer));
            }
        });
        Ok(EchoApp { accepted, task })
    }

    /// An HTTP server (HTTP/1.1, or HTTP/2 with prior knowledge when `http2`) that answers every
    /// request `200 <method> <path>`.
    pub async fn http(&self, port: u16, http2: bool) -> io::Result<HttpApp> {
        let listener = self.listen(port).await?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_http(stream, http2));
            }
        });
        Ok(HttpApp { task })
    }
}

async fn serve_http(stream: TcpStream, http2: bool) {
    let service = hyper::service::service_fn(|request: http::Request<_>| async move {
        let body = format!("{} {}", request.method(), request.uri().path());
        let body = http_body_util::Full::new(bytes::Bytes::from(body));
        Ok::<_, std::convert::Infallible>(http::Response::new(body))
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    // The connection ends with an error when the client goes: nothing to report.
    let _ = if http2 {
        let executor = hyper_util::rt::TokioExecutor::new();
        hyper::server::conn::http2::Builder::new(executor)
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
    };
}

/// The server [`InPod::http`] starts; stops when dropped.
#[derive(Debug)]
pub struct HttpApp {
    task: JoinHandle<()>,
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    if stream
        .write_all(format!("{}\n", peer.ip()).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// The server [`InPod::echo`] starts; stops when dropped.
#[derive(Debug)]
pub struct EchoApp {
    /// Connections accepted, by client IP.
    accepted: Arc<Mutex<HashMap<IpAddr, usize>>>,
    task: JoinHandle<()>,
}

impl EchoApp {
    /// Connections the app has accepted.
    pub fn accepted(&self) -> usize {
        lock(&self.accepted).values().sum()
    }

    /// Connections the app has accepted from `client`.
    pub fn accepted_from(&self, client: IpAddr) -> usize {
        lock(&self.accepted).get(&client).copied().unwrap_or(0)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the echo app's first line: the client address it saw.
pub async fn read_peer_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte);
    }
}
