//! Opening HBONE tunnels: one CONNECT stream per proxied TCP connection, over pooled mTLS.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_identity::{CertificateError, CertificateManager, FetchError, Identity};
use bytes::Bytes;
use http::StatusCode;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::sockets::SocketFactory;
use crate::telemetry::Meter;

use super::headers::{self, Baggage, TraceParent};
use super::pool::{Dialed, Pool, PoolKey, StreamClaim};
use super::stream::{self, CopyError, H2Io, H2Stream, Transferred};
use super::{
    CONNECTION_WINDOW, ClientSettings, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, STREAM_WINDOW,
};

/// One tunnel to open.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The workload the tunnel is opened for; its certificate authenticates the client.
    pub source: Identity,
    /// The client's address: the tunnel's source IP, and `forwarded: for=`.
    pub source_addr: SocketAddr,
    /// Where the HBONE server listens: the destination pod's (or its waypoint's) port 15008.
    pub hbone_addr: SocketAddr,
    /// The original destination, sent as `:authority`.
    pub authority: SocketAddr,
    /// The hostname of the Service the client addressed, if it did: `forwarded: host=`.
    pub service: Option<String>,
    /// The identities the server may prove; any other is refused.
    pub expected_identities: Vec<Identity>,
    pub baggage: Option<Baggage>,
    /// The trace the tunnel belongs to, sent as `traceparent`.
    pub trace: TraceParent,
}

/// Why no tunnel was opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the request names no identity the server may prove")]
    NoExpectedIdentity,
    #[error("no certificate for the source workload")]
    Certificate(#[source] FetchError),
    #[error("failed to connect to {addr} from {source_ip}")]
    Dial {
        addr: SocketAddr,
        source_ip: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr} took longer than {timeout:?} (stuck at {stage})")]
    DialTimeout {
        addr: SocketAddr,
        stage: DialStage,
        timeout: Duration,
    },
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed")]
    H2Handshake {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("failed to open a stream to {addr}")]
    OpenStream {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{addr} did not answer the tunnel to {authority} within {timeout:?}")]
    ResponseTimeout {
        addr: SocketAddr,
        authority: SocketAddr,
        timeout: Duration,
    },
    #[error("failed to read the expiry of the certificate {addr} presented")]
    PeerCertificate {
        addr: SocketAddr,
        #[source]
        source: CertificateError,
    },
    /// The dial this request waited for failed. Every caller that waited gets this, and so
    /// does the caller that dialed once anyone waited; alone, it gets the error itself.
    #[error("the shared dial to {addr} failed")]
    SharedDial {
        addr: SocketAddr,
        #[source]
        source: Arc<ConnectError>,
    },
    /// Reading what the client had sent failed: it went away before its tunnel opened.
    #[error("the client's connection failed before the tunnel opened")]
    Client(#[source] io::Error),
    #[error("{addr} refused the tunnel to {authority} with status {status}")]
    Refused {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
}

impl ConnectError {
    /// Whether the destination's policy refused the tunnel (401).
    pub fn is_denied(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }

    /// Whether the failure is the server's own: it could not be reached or did not complete
    /// the handshakes, or (when it is the endpoint itself, not a waypoint answering for what is
    /// behind it) it could not reach its app (503). Not the client's (certificate, socket), and
    /// not a policy's refusal.
    pub(crate) fn is_server_fault(&self, through_waypoint: bool) -> bool {
        match self {
            Self::Dial { .. }
            | Self::Tls { .. }
            | Self::H2Handshake { .. }
            | Self::OpenStream { .. }
            | Self::ResponseTimeout { .. }
            | Self::PeerCertificate { .. } => true,
            Self::DialTimeout { stage, .. } => {
                !matches!(stage, DialStage::Certificate | DialStage::Socket)
            }
            Self::SharedDial { source, .. } => source.is_server_fault(through_waypoint),
            Self::Refused { status, .. } => {
                !through_waypoint && *status == StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NoExpectedIdentity | Self::Certificate(_) | Self::Client(_) => false,
        }
    }
}

/// The steps of dialing a pooled connection, for saying which one took too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialStage {
    Certificate,
    Socket,
    TcpConnect,
    TlsHandshake,
    Http2Handshake,
}

impl std::fmt::Display for DialStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Certificate => "the certificate",
            Self::Socket => "creating the socket",
            Self::TcpConnect => "the TCP handshake",
            Self::TlsHandshake => "the TLS handshake",
            Self::Http2Handshake => "the HTTP/2 handshake",
        })
    }
}

/// Where the bytes that go right behind a CONNECT come from: bytes a client has sent already,
/// so that the server's app has them a round trip sooner.
pub trait EarlyBytes: Send {
    /// What there is to send, without waiting. Called once the connection the tunnel goes on is
    /// at hand (dialing a new one takes round trips, in which a client that speaks first may
    /// speak), and again for a retry if it gave nothing.
    fn take_early(&mut self) -> io::Result<Bytes>;
}

/// Bytes at hand (none, for a tunnel that starts empty).
impl EarlyBytes for Bytes {
    fn take_early(&mut self) -> io::Result<Bytes> {
        Ok(std::mem::take(self))
    }
}

/// An open tunnel: a CONNECT stream the server answered with 200.
#[derive(Debug)]
pub struct Tunnel {
    stream: H2Stream,
    claim: StreamClaim,
    /// How many bytes went with the request (from the `early` of [`HboneClient::connect`]).
    early: usize,
}

impl Tunnel {
    /// Carries `tcp` through the tunnel until both sides have closed, counting the bytes with
    /// `meter`, those that went with the request first.
    pub async fn copy_bidirectional(
        self,
        tcp: &mut TcpStream,
        meter: &Meter,
    ) -> Result<Transferred, CopyError> {
        meter.sent(self.early);
        let mut copied = stream::copy_bidirectional(tcp, self.stream, meter).await?;
        copied.sent += self.early as u64;
        Ok(copied)
    }

    /// The tunnel as a byte stream, with the claim on its pooled connection to hold while it
    /// is used. For tunnels opened without early bytes: the stream does not count them.
    pub(crate) fn into_io(self) -> (H2Io, StreamClaim) {
        debug_assert_eq!(self.early, 0, "early bytes would go uncounted");
        (H2Io::new(self.stream), self.claim)
    }
}

/// Opens HBONE tunnels for the workloads whose certificates `certificates` holds.
#[derive(Debug, Clone)]
pub struct HboneClient {
    certificates: Arc<CertificateManager>,
    pool: Pool,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl HboneClient {
    pub fn new(certificates: Arc<CertificateManager>, settings: ClientSettings) -> Self {
        Self {
            certificates,
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.response_timeout,
            pool: Pool::new(settings),
        }
    }

    /// Opens a tunnel; a new pooled connection, if one is needed, is dialed from a socket of
    /// `sockets` (the source workload's namespace). What `early` gives once that connection is
    /// at hand goes right behind the request instead of after the server's answer. The server
    /// holds it until it has authorized the tunnel and connected its app, and drops it if it
    /// refuses.
    pub async fn connect(
        &self,
        request: &ConnectRequest,
        sockets: &dyn SocketFactory,
        early: &mut dyn EarlyBytes,
    ) -> Result<Tunnel, ConnectError> {
        if request.expected_identities.is_empty() {
            return Err(ConnectError::NoExpectedIdentity);
        }
        let mut expected = request.expected_identities.clone();
        expected.sort();
        expected.dedup();
        let key = PoolKey {
            source: request.source.clone(),
            source_ip: request.source_addr.ip(),
            destination: request.hbone_addr,
            expected,
        };
        // A stream refused by a connection that looked usable (a GOAWAY raced the claim, or
        // REFUSED_STREAM) was never processed, so it is tried once more, on a connection
        // dialed if need be.
        let mut retried = false;
        let mut bytes = Bytes::new();
        loop {
            // Boxed: most tunnels reuse a pooled connection and never need the dial's large
            // state.
            let claim = self
                .pool
                .checkout(&key, || Box::pin(self.dial(&key, sockets)))
                .await?;
            // A retry sends again what the first attempt took.
            if bytes.is_empty() {
                bytes = early.take_early().map_err(ConnectError::Client)?;
            }
            match self.open_stream(request, claim, &bytes).await {
                Ok(tunnel) => return Ok(tunnel),
                Err(Refusal::Unprocessed(error)) if !retried => {
                    tracing::debug!(dst.addr = %key.destination, error = %error, "retrying a stream on another HBONE connection");
                    retried = true;
                }
                Err(Refusal::Unprocessed(error) | Refusal::Failed(error)) => return Err(error),
            }
        }
    }

    /// Sends the CONNECT on the claimed connection, `early` behind it, and waits, up to the
    /// response timeout, for the answer. A connection that refuses the stream is retired.
    async fn open_stream(
        &self,
        request: &ConnectRequest,
        claim: StreamClaim,
        early: &Bytes,
    ) -> Result<Tunnel, Refusal> {
        let (addr, authority) = (request.hbone_addr, request.authority);
        let connect = headers::connect_request(
            authority,
            request.source_addr,
            request.service.as_deref(),
            request.baggage.as_ref(),
            &request.trace,
        );
        let opened =
            tokio::time::timeout(self.response_timeout, send_connect(&claim, connect, early))
                .await
                .map_err(|_| {
                    Refusal::Failed(ConnectError::ResponseTimeout {
                        addr,
                        authority,
                        timeout: self.response_timeout,
                    })
                })?;
        let (response, send) = opened.map_err(|(source, unprocessed)| {
            let error = ConnectError::OpenStream { addr, source };
            if unprocessed {
                claim.retire();
                Refusal::Unprocessed(error)
            } else {
                Refusal::Failed(error)
            }
        })?;
        if response.status() != StatusCode::OK {
            return Err(Refusal::Failed(ConnectError::Refused {
                addr,
                authority,
                status: response.status(),
            }));
        }
        Ok(Tunnel {
            stream: H2Stream {
                send,
                recv: response.into_body(),
            },
            claim,
            early: early.len(),
        })
    }

    /// Connections in the pool, for observability and tests.
    pub fn pooled_connections(&self) -> usize {
        self.pool.connections()
    }

    /// Streams open, also on connections that left the pool (GOAWAY, too old) and only
    /// finish the streams they carry.
    pub fn pooled_streams(&self) -> usize {
        self.pool.streams()
    }

    /// Pool keys (who calls whom) with a pooled connection or a dial in flight.
    pub fn pool_keys(&self) -> usize {
        self.pool.keys()
    }

    async fn dial(
        &self,
        key: &PoolKey,
        sockets: &dyn SocketFactory,
    ) -> Result<Dialed, ConnectError> {
        let addr = key.destination;
        let deadline = Deadline {
            at: tokio::time::Instant::now() + self.connect_timeout,
            timeout: self.connect_timeout,
            addr,
        };
        let certificate = deadline
            .run(DialStage::Certificate, self.certificates.fetch(&key.source))
            .await?
            .map_err(ConnectError::Certificate)?;

        let dial_error = |source| ConnectError::Dial {
            addr,
            source_ip: key.source_ip,
            source,
        };
        let socket = deadline
            .run(
                DialStage::Socket,
                sockets.connector(SocketAddr::new(key.source_ip, 0), false),
            )
            .await?
            .map_err(dial_error)?;
        let tcp = deadline
            .run(DialStage::TcpConnect, socket.connect(addr))
            .await?
            .map_err(dial_error)?;
        tcp.set_nodelay(true).map_err(dial_error)?;

        let tls_config = ambit_identity::client_config(&certificate, &key.expected);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config));
        let mut tls = deadline
            .run(
                DialStage::TlsHandshake,
                connector.connect(addr.ip().into(), tcp),
            )
            .await?
            .map_err(|source| ConnectError::Tls { addr, source })?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(super::TLS_BUFFER_LIMIT));
        let certificates_expire = certificate.not_after().min(
            peer_not_after(&tls)
                .map_err(|source| ConnectError::PeerCertificate { addr, source })?,
        );

        http2_handshake(tls, &deadline, certificates_expire).await
    }
}

/// Starts HTTP/2 on a dialed TLS connection, with HBONE's settings.
async fn http2_handshake(
    tls: TlsStream<TcpStream>,
    deadline: &Deadline,
    certificates_expire: SystemTime,
) -> Result<Dialed, ConnectError> {
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false)
        .handshake(tls);
    let addr = deadline.addr;
    let (sender, mut connection) = deadline
        .run(DialStage::Http2Handshake, handshake)
        .await?
        .map_err(|source| ConnectError::H2Handshake { addr, source })?;
    let pings = connection
        .ping_pong()
        .unwrap_or_else(|| unreachable!("ping_pong is taken once, from a new connection"));
    Ok(Dialed {
        sender,
        connection,
        pings,
        certificates_expire,
    })
}

/// Why a CONNECT got no tunnel.
enum Refusal {
    /// The server never processed the stream (GOAWAY, refused stream, connection gone): safe
    /// to send again elsewhere.
    Unprocessed(ConnectError),
    Failed(ConnectError),
}

/// Opens the stream, sends `early` on it, and waits for the response head. The error says
/// whether the server never processed the stream.
async fn send_connect(
    claim: &StreamClaim,
    connect: http::Request<()>,
    early: &Bytes,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), (h2::Error, bool)> {
    // Errors before anything is sent are the connection's (GOAWAY received, closed), except
    // for a request h2 refuses to encode, which no other connection would take either.
    let unsent = |error: h2::Error| {
        let unprocessed = error.is_go_away() || error.is_io();
        (error, unprocessed)
    };
    let (response, mut send) = claim
        .sender()
        .ready()
        .await
        .map_err(unsent)?
        .send_request(connect, false)
        .map_err(unsent)?;
    // At most one read's worth: h2 holds what the peer's window does not take yet. The
    // request may have gone out already, so a failure here is not known to be unprocessed.
    if !early.is_empty() {
        send.send_data(early.clone(), false)
            .map_err(|error| (error, false))?;
    }
    let response = response.await.map_err(|error| {
        // A stream above a graceful GOAWAY's last stream id, or refused, was not processed.
        let unprocessed = error.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (error.is_go_away()
                && error.is_remote()
                && error.reason() == Some(h2::Reason::NO_ERROR));
        (error, unprocessed)
    })?;
    Ok((response, send))
}

/// When the certificate the server presented stops being valid.
fn peer_not_after(tls: &TlsStream<TcpStream>) -> Result<SystemTime, CertificateError> {
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(CertificateError::EmptyChain)?;
    ambit_identity::certificate_not_after(leaf)
}

/// The deadline of one dial, shared by its steps.
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
    addr: SocketAddr,
}

impl Deadline {
    async fn run<T>(
        &self,
        stage: DialStage,
        step: impl Future<Output = T>,
    ) -> Result<T, ConnectError> {
        tokio::time::timeout_at(self.at, step)
            .await
            .map_err(|_| ConnectError::DialTimeout {
                addr: self.addr,
                stage,
                timeout: self.timeout,
            })
    }
}
