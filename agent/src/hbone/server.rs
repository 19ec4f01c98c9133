//! Accepting HBONE in front of one workload: mTLS, then HTTP/2, then one TCP connection to the
//! app per CONNECT stream.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_identity::{ALPN_H2, CertificateManager, FetchError, Identity, WorkloadCertificate};
use ambit_redirect::AGENT_POD_PORTS;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::headers::{self, Baggage};
use super::keepalive::{self, KeepaliveError};
use super::stream::{self, H2Stream};
use super::{CONNECTION_WINDOW, Keepalive, MAX_FRAME_SIZE, SERVER_MAX_STREAMS, STREAM_WINDOW};
use crate::accept::serve_listener;
use crate::access::ConnectionRecord;
use crate::admission::{Admission, HandshakeFailure, Listener, Pending, PendingLimits};
use crate::authorize::{Authorizer, InboundRequest, RevokedFuture, Verdict};
use crate::drain::DrainWatcher;
use crate::error_chain::ErrorChain;
use crate::sockets::{self, SocketFactory};
use crate::telemetry::{Direction, Endpoints, Meter, Reporter, Telemetry, TrafficLabels};

/// Why an HBONE connection ended before its peer closed it.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the workload has no valid identity to serve as")]
    NoIdentity,
    #[error("no certificate to serve as {identity}")]
    Certificate {
        identity: Identity,
        #[source]
        source: FetchError,
    },
    #[error("failed to set up the accepted connection")]
    Socket(#[source] io::Error),
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("the TLS and HTTP/2 handshakes took longer than {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the client did not negotiate ALPN h2")]
    Alpn,
    #[error("HTTP/2 failed")]
    H2(#[source] h2::Error),
    #[error("keepalive failed")]
    Keepalive(#[source] KeepaliveError),
}

/// An HBONE server: terminates tunnels with mTLS and HTTP/2, and hands each CONNECT stream to
/// its handler: the app of the workload it fronts, or a waypoint's routing.
#[derive(Debug)]
pub struct HboneServer {
    /// The identity served; it changes with the workload's service account, and is `None`
    /// while that makes no valid identity (connections are refused then).
    identity: watch::Receiver<Option<Identity>>,
    certificates: Arc<CertificateManager>,
    keepalive: Keepalive,
    handler: Arc<dyn StreamHandler>,
    telemetry: Arc<Telemetry>,
    /// Bounds connections whose handshakes are not done yet.
    admission: Arc<Admission>,
    /// The TLS configuration of the current certificate, rebuilt when it is renewed.
    tls: Mutex<Option<(Arc<WorkloadCertificate>, Arc<ServerConfig>)>>,
}

type H2Connection = h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>;

/// What a CONNECT stream's handler knows about its connection.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// What the client proved: its workload certificate's identity.
    pub(crate) identity: Option<Identity>,
    pub(crate) local_ip: IpAddr,
    /// What the server proved to the peer.
    pub(crate) server_identity: Identity,
}

/// What a server does with each CONNECT stream of an authenticated connection.
pub(crate) trait StreamHandler: Send + Sync + std::fmt::Debug + 'static {
    fn serve(
        self: Arc<Self>,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: Arc<Peer>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The node agent's handling: each stream to the app of the pod the server fronts, as
/// authorization allows.
#[derive(Debug)]
struct Inbound {
    /// Connects to the app, from the client's address where the factory can.
    sockets: Arc<dyn SocketFactory>,
    /// Decides which streams may reach the app, and closes those a policy change denies.
    authorizer: Arc<dyn Authorizer>,
    telemetry: Arc<Telemetry>,
}

impl StreamHandler for Inbound {
    fn serve(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Arc<Peer>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        // Decided before the stream's task starts: nothing of the request but its body
        // (headers, baggage) stays in the task for as long as the tunnel lasts.
        let Some(admitted) = admit(&request, &mut respond, &peer, &self) else {
            return Box::pin(std::future::ready(()));
        };
        let target = App {
            client: SocketAddr::new(peer.addr.ip(), 0),
            destination: admitted.destination,
            sockets: self.sockets.clone(),
        };
        Box::pin(tunnel_to_app(
            target,
            request.into_body(),
            respond,
            admitted.record,
            admitted.revoked,
        ))
    }
}

impl HboneServer {
    /// The server of a workload's tunnels, to its app.
    pub fn new(
        identity: Identity,
        certificates: Arc<CertificateManager>,
        keepalive: Keepalive,
        sockets: Arc<dyn SocketFactory>,
        authorizer: Arc<dyn Authorizer>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let inbound = Inbound {
            sockets,
            authorizer,
            telemetry: telemetry.clone(),
        };
        Self::with_handler(
            identity,
            certificates,
            keepalive,
            Arc::new(inbound),
            telemetry,
        )
    }

    /// A server whose streams go to `handler`.
    pub(crate) fn with_handler(
        identity: Identity,
        certificates: Arc<CertificateManager>,
        keepalive: Keepalive,
        handler: Arc<dyn StreamHandler>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            identity: watch::channel(Some(identity)).1,
            certificates,
            keepalive,
            handler,
            telemetry,
            admission: Arc::new(Admission::unregistered(PendingLimits::default())),
            tls: Mutex::default(),
        }
    }

    /// Serves as the identity `identity` holds at each new connection.
    pub(crate) fn following_identity(
        mut self,
        identity: watch::Receiver<Option<Identity>>,
    ) -> Self {
        self.identity = identity;
        self
    }

    /// Admits connections, and bounds their handshakes, with the node's `admission`.
    pub(crate) fn admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// Accepts connections on `listener` until a drain starts; connections already accepted
    /// are asked to finish (GOAWAY) and keep their watcher until they do.
    pub async fn serve(self, listener: TcpListener, drain: DrainWatcher) {
        let server = Arc::new(self);
        serve_listener(listener, drain, "hbone", move |tcp, addr, drain| {
            server.clone().serve_tcp(tcp, addr, drain)
        })
        .await;
    }

    /// Admits one accepted connection, shakes hands within the handshake timeout, then serves
    /// its streams.
    async fn serve_tcp(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: DrainWatcher) {
        let _open = self.telemetry.metrics.socket_opened(Reporter::Destination);
        let Some(pending) = self.admission.admit(Listener::Hbone, &tcp, addr) else {
            return;
        };
        let timeout = self.admission.limits().handshake_timeout;
        let handshake = self.clone().handshake(tcp, pending);
        let (connection, peer) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(established)) => established,
            Ok(Err(error)) => {
                let error = ErrorChain(&error);
                return self
                    .admission
                    .handshake_failed(HandshakeFailure::Error, addr, &error);
            }
            Err(_) => {
                let error = ServerError::HandshakeTimeout(timeout);
                return self
                    .admission
                    .handshake_failed(HandshakeFailure::Timeout, addr, &error);
            }
        };
        if let Err(error) = self.serve_connection(connection, peer, drain).await {
            tracing::warn!(src.addr = %addr, error = %ErrorChain(&error), "HBONE connection failed");
        }
    }

    /// TLS, then HTTP/2, within the pending slot the connection holds until both are done.
    async fn handshake(
        self: Arc<Self>,
        tcp: TcpStream,
        _pending: Pending,
    ) -> Result<(H2Connection, Arc<Peer>), ServerError> {
        let local_ip = tcp.local_addr().map_err(ServerError::Socket)?.ip();
        let addr = tcp.peer_addr().map_err(ServerError::Socket)?;
        let server_identity = self
            .identity
            .borrow()
            .clone()
            .ok_or(ServerError::NoIdentity)?;
        let tls_config = self.tls_config(&server_identity).await?;
        let mut tls = tokio_rustls::TlsAcceptor::from(tls_config)
            .accept(tcp)
            .await
            .map_err(ServerError::Handshake)?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(super::TLS_BUFFER_LIMIT));
        let session = tls.get_ref().1;
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(ServerError::Alpn);
        }
        // The verifier accepted the chain only with a workload identity in it.
        let identity = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| ambit_identity::certificate_identity(leaf).ok());
        let peer = Arc::new(Peer {
            addr,
            identity,
            local_ip,
            server_identity,
        });
        let connection = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
            .handshake(tls)
            .await
            .map_err(ServerError::H2)?;
        Ok((connection, peer))
    }

    /// Serves the CONNECT streams of an established connection until it closes; a drain
    /// sends GOAWAY and waits for the open streams to finish.
    async fn serve_connection(
        self: Arc<Self>,
        mut connection: H2Connection,
        peer: Arc<Peer>,
        mut drain: DrainWatcher,
    ) -> Result<(), ServerError> {
        let pings = connection
            .ping_pong()
            .unwrap_or_else(|| unreachable!("ping_pong is taken once, from a new connection"));
        let mut keepalive = std::pin::pin!(keepalive::run(pings, self.keepalive));
        let mut draining = false;
        loop {
            tokio::select! {
                request = connection.accept() => match request {
                    None => return Ok(()),
                    Some(Err(error)) => return Err(ServerError::H2(error)),
                    Some(Ok((request, respond))) => {
                        tokio::spawn(self.handler.clone().serve(request, respond, peer.clone()));
                    }
                },
                error = &mut keepalive => return Err(ServerError::Keepalive(error)),
                () = drain.signaled(), if !draining => {
                    connection.graceful_shutdown();
                    draining = true;
                }
            }
        }
    }

    async fn tls_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>, ServerError> {
        let certificate =
            self.certificates
                .fetch(identity)
                .await
                .map_err(|source| ServerError::Certificate {
                    identity: identity.clone(),
                    source,
                })?;
        let mut cached = self.tls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached_certificate, config)) = cached.as_ref()
            && Arc::ptr_eq(cached_certificate, &certificate)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(ambit_identity::server_config(&certificate));
        *cached = Some((certificate, config.clone()));
        Ok(config)
    }
}

/// A CONNECT the destination's policy allows.
struct Admitted {
    destination: SocketAddr,
    record: ConnectionRecord,
    revoked: RevokedFuture,
}

/// Validates one CONNECT: its destination and the policy; opens the connection's record. A
/// refused stream is answered here; an admitted one goes to the app ([`tunnel_to_app`]).
fn admit(
    request: &Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
    peer: &Peer,
    server: &Inbound,
) -> Option<Admitted> {
    let destination = match headers::destination(request, peer.local_ip, &AGENT_POD_PORTS) {
        Ok(destination) => destination,
        Err(error) => {
            let src_identity = peer.identity.as_ref().map(tracing::field::display);
            tracing::info!(src.addr = %peer.addr, src.identity = src_identity, %error, "refused CONNECT");
            reply(respond, error.status());
            return None;
        }
    };
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    let baggage = header(headers::BAGGAGE)
        .map(Baggage::parse)
        .unwrap_or_default();
    let trace = headers::trace(request);
    let inbound = InboundRequest {
        source_ip: peer.addr.ip(),
        source_identity: peer.identity.clone(),
        destination,
    };
    let peers = server.authorizer.peers(&inbound);
    let labels = TrafficLabels::new(
        Reporter::Destination,
        &server.telemetry.cluster,
        (peers.source.as_deref(), peer.identity.as_ref()),
        (peers.destination.as_deref(), Some(&peer.server_identity)),
        peers.service.as_deref(),
    );
    let endpoints = Endpoints {
        direction: Direction::Inbound,
        src: peer.addr,
        dst: destination,
        src_identity: peer.identity.clone(),
        dst_identity: Some(peer.server_identity.clone()),
        // The source's own claim (baggage) only when the cluster does not know it.
        src_workload: peers
            .source
            .as_ref()
            .map(|w| w.qualified_name())
            .or_else(|| {
                let (namespace, (_, name)) =
                    baggage.namespace.as_ref().zip(baggage.workload.as_ref())?;
                Some(format!("{namespace}/{name}"))
            }),
        dst_workload: peers.destination.as_ref().map(|w| w.qualified_name()),
        trace_id: trace.map(|t| t.trace_id),
    };
    let record = ConnectionRecord::open(&server.telemetry, endpoints, labels);
    if let Verdict::Deny { policy, reason } = server.authorizer.authorize(&inbound) {
        reply(respond, StatusCode::UNAUTHORIZED);
        record.deny(policy.as_deref(), reason);
        return None;
    }
    if let (Some(source), Some(workload)) = (&peer.identity, &peers.destination) {
        let baseline = &server.telemetry.baseline;
        baseline.observe(source, workload, &peer.server_identity, destination.port());
    }
    Some(Admitted {
        destination,
        record,
        revoked: server.authorizer.revoked(inbound),
    })
}

/// Where a tunnel ends: the app, reached from the client's address.
struct App {
    client: SocketAddr,
    destination: SocketAddr,
    sockets: Arc<dyn SocketFactory>,
}

/// Connects to the app as the client (the app sees the client's IP), then copies until both
/// sides close or a policy change revokes the connection.
async fn tunnel_to_app(
    target: App,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
    record: ConnectionRecord,
    revoked: RevokedFuture,
) {
    let connect = sockets::connect(
        target.sockets.as_ref(),
        target.client,
        true,
        target.destination,
    );
    let mut app = match connect.await {
        Ok(app) => app,
        Err(error) => {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return record.fail(error);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(error) => return record.fail(error),
    };
    let stream = H2Stream { send, recv };
    let copy = async |meter: &Meter| stream::copy_bidirectional(&mut app, stream, meter).await;
    record.establish().carry_until_revoked(copy, revoked).await;
}

pub(crate) fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, %status, "failed to answer a refused CONNECT");
    }
}
