//! The peers these tests talk to: an HBONE client and server pair, raw TLS and HTTP/2 clients
//! that send what ambit never would, and a server that stops answering.

#![expect(
    clippy::unwrap_used,
    reason = "a peer that cannot be set up fails the test"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambit_agent::authorize::{AllowAll, Authorizer};
use ambit_agent::drain::{self, DrainTrigger};
use ambit_agent::sockets::LocalSockets;
use ambit_agent::telemetry::Meter;
use ambit_agent::{
    Baggage, ClientSettings, ConnectError, ConnectRequest, CopyError, HboneClient, HboneServer,
    Keepalive, TraceParent, Transferred, Tunnel, WorkloadKind,
};
use ambit_identity::{CertificateManager, Identity, WorkloadCertificate};
use ambit_test_support::{EchoServer, TestPki};
use bytes::Bytes;
use h2::RecvStream;
use h2::client::SendRequest;
use h2::server::SendResponse;
use http::{Method, Request, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// An HBONE server for `shop/backend` on loopback and a client acting for `shop/frontend`.
pub(crate) struct Mesh {
    pub(crate) pki: TestPki,
    pub(crate) client: HboneClient,
    pub(crate) client_identity: Identity,
    pub(crate) server_identity: Identity,
    pub(crate) server_addr: SocketAddr,
    _drain: DrainTrigger,
}

/// The trace of every tunnel [`Mesh::request`] describes.
pub(crate) const TRACE: TraceParent = TraceParent {
    trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
    parent_id: 0x00f0_67aa_0ba9_02b7,
    sampled: false,
};

impl Mesh {
    pub(crate) async fn start() -> Self {
        Self::start_with(ClientSettings::default()).await
    }

    pub(crate) async fn start_with(settings: ClientSettings) -> Self {
        Self::with_pki(TestPki::new("cluster.local"), settings).await
    }

    pub(crate) async fn with_pki(pki: TestPki, settings: ClientSettings) -> Self {
        Self::with_authorizer(pki, settings, Arc::new(AllowAll)).await
    }

    pub(crate) async fn with_authorizer(
        pki: TestPki,
        settings: ClientSettings,
        authorizer: Arc<dyn Authorizer>,
    ) -> Self {
        let certificates = pki.manager();
        let server_identity = pki.identity("shop", "backend");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let (trigger, watcher) = drain::channel();
        let server = HboneServer::new(
            server_identity.clone(),
            certificates.clone(),
            Keepalive::default(),
            Arc::new(LocalSockets),
            authorizer,
            Arc::default(),
        );
        tokio::spawn(server.serve(listener, watcher));
        Self {
            client: HboneClient::new(certificates, settings),
            client_identity: pki.identity("shop", "frontend"),
            server_identity,
            server_addr,
            pki,
            _drain: trigger,
        }
    }

    /// A tunnel from the client workload to `authority`, through the server.
    pub(crate) fn request(&self, authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            source: self.client_identity.clone(),
            source_addr: "127.0.0.1:40000".parse().unwrap(),
            hbone_addr: self.server_addr,
            authority,
            service: None,
            expected_identities: vec![self.server_identity.clone()],
            baggage: Some(Baggage {
                namespace: Some("shop".into()),
                workload: Some((WorkloadKind::Deployment, "frontend".into())),
                ..Baggage::default()
            }),
            trace: TRACE,
        }
    }

    /// Opens a tunnel to `destination` and returns the app's end of it: a plain TCP socket, as
    /// an application in the client pod would hold.
    pub(crate) async fn open(&self, destination: SocketAddr) -> Result<TcpStream, ConnectError> {
        let tunnel = self
            .client
            .connect(&self.request(destination), &LocalSockets, &mut Bytes::new())
            .await?;
        Ok(carry(tunnel).await)
    }

    /// A fresh tunnel still echoes: the server survived whatever the test did to it.
    pub(crate) async fn assert_still_serving(&self) {
        let echo = EchoServer::start().await;
        let mut app = self.open(echo.addr()).await.unwrap();
        app.write_all(b"still here").await.unwrap();
        let mut reply = [0; 10];
        app.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"still here");
    }
}

/// Copies a loopback socket pair through `tunnel` and hands back the app side.
pub(crate) async fn carry(tunnel: Tunnel) -> TcpStream {
    carry_counted(tunnel).await.0
}

/// [`carry`], with the copy's outcome once both sides have closed.
pub(crate) async fn carry_counted(
    tunnel: Tunnel,
) -> (TcpStream, JoinHandle<Result<Transferred, CopyError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut agent_side, _) = listener.accept().await.unwrap();
    let copy = tokio::spawn(async move {
        tunnel
            .copy_bidirectional(&mut agent_side, &Meter::default())
            .await
    });
    (app, copy)
}

/// Polls `condition` until it holds; fails the test after ten seconds.
pub(crate) async fn eventually(condition: impl Fn() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}

/// A TLS client that offers `versions` and `certificate` and trusts any server: it tests what
/// the server accepts, not the other way round.
pub(crate) fn tls_client(
    certificate: Option<&WorkloadCertificate>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerAcceptAnyServer(provider)));
    let mut config = match certificate {
        Some(certificate) => builder.with_client_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from(certificate.certified_key().clone()),
        )),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Whether the server at `addr` accepts a client with `config`: it does when it goes on to send
/// its HTTP/2 SETTINGS; otherwise the alert it sent.
pub(crate) async fn server_verdict(
    config: ClientConfig,
    addr: SocketAddr,
) -> Result<(), AlertDescription> {
    let outcome = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(addr.ip().into(), tcp)
            .await?;
        let mut frame_header = [0; 9];
        tls.read_exact(&mut frame_header).await?;
        Ok::<_, std::io::Error>(frame_header)
    };
    match outcome.await {
        Ok(frame_header) => {
            assert_eq!(frame_header[3], 4, "the server's first frame is SETTINGS");
            Ok(())
        }
        Err(error) => match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::AlertReceived(alert)) => Err(*alert),
            _ => panic!("expected a TLS alert, got {error}"),
        },
    }
}

/// An HTTP/2 connection to the mesh's server with a valid client certificate, for sending
/// requests the HBONE client never sends.
pub(crate) async fn raw_h2(mesh: &Mesh) -> SendRequest<Bytes> {
    let certificate = mesh.pki.certificate(&mesh.client_identity);
    let config =
        ambit_identity::client_config(&certificate, std::slice::from_ref(&mesh.server_identity));
    let tcp = TcpStream::connect(mesh.server_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(mesh.server_addr.ip().into(), tcp)
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends one request without a body and returns the status of the answer.
pub(crate) async fn send(
    h2: &mut SendRequest<Bytes>,
    method: Method,
    authority: &str,
) -> StatusCode {
    // Only CONNECT takes a bare authority; other methods need a scheme and a path.
    let uri = if method == Method::CONNECT {
        authority.to_owned()
    } else {
        format!("http://{authority}/")
    };
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (response, _body) = h2
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    response.await.unwrap().status()
}

/// The frame types in a stream of HTTP/2 frames (9-byte header, then the payload).
pub(crate) fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

/// Streams an [`H2Server`] allows on one connection: fewer than the client would open.
pub(crate) const H2_SERVER_MAX_STREAMS: u32 = 3;

/// What an [`H2Server`] does with the CONNECT streams it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200, then echoes the stream's bytes.
    Echo,
    /// 200 only once the stream's first bytes have arrived, then echoes them and the rest.
    EchoAfterData,
    /// Never answers; holds the stream open.
    Silent,
    /// Resets every stream with REFUSED_STREAM on the first `n` connections; echoes on later
    /// ones.
    RefuseOnFirst(usize),
    /// 200, echoes the stream's first bytes, and resets it when more arrive.
    ResetAfterEcho,
}

/// An HTTP/2 server with a valid HBONE certificate that answers CONNECTs as told, counts the
/// connections it accepted and still has open, and sends GOAWAY on demand.
pub(crate) struct H2Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// Bumped to make the open connections say GOAWAY.
    goaway: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl H2Server {
    /// Serves as `identity`, with a certificate fetched from `certificates` for each
    /// connection.
    pub(crate) async fn start(
        certificates: Arc<CertificateManager>,
        identity: Identity,
        answer: Answer,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let goaway = watch::Sender::new(0);
        let (counted, opened, shutdown) = (accepted.clone(), open.clone(), goaway.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let index = counted.fetch_add(1, Ordering::SeqCst);
                let certificate = certificates.fetch(&identity).await.unwrap();
                let answer = match answer {
                    Answer::RefuseOnFirst(n) if index >= n => Answer::Echo,
                    answer => answer,
                };
                let (opened, shutdown) = (opened.clone(), shutdown.subscribe());
                opened.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve_h2(tcp, &certificate, answer, shutdown).await;
                    opened.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
            goaway,
            task,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections still open.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Starts a graceful shutdown (GOAWAY) of every connection open now; later ones are
    /// served normally.
    pub(crate) fn goaway(&self) {
        self.goaway.send_modify(|generation| *generation += 1);
    }
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_h2(
    tcp: TcpStream,
    certificate: &WorkloadCertificate,
    answer: Answer,
    mut goaway: watch::Receiver<u64>,
) {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(ambit_identity::server_config(certificate)));
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(H2_SERVER_MAX_STREAMS)
        .handshake(tls);
    let Ok(mut connection) = handshake.await else {
        return;
    };
    let mut silent = Vec::new();
    loop {
        tokio::select! {
            request = connection.accept() => match request {
                Some(Ok((request, mut respond))) => match answer {
                    Answer::Echo => {
                        tokio::spawn(echo(request.into_body(), respond, Bytes::new()));
                    }
                    Answer::EchoAfterData => {
                        tokio::spawn(echo_after_data(request.into_body(), respond));
                    }
                    Answer::Silent => silent.push((request, respond)),
                    Answer::RefuseOnFirst(_) => respond.send_reset(h2::Reason::REFUSED_STREAM),
                    Answer::ResetAfterEcho => {
                        tokio::spawn(reset_after_echo(request.into_body(), respond));
                    }
                },
                _ => return,
            },
            Ok(()) = goaway.changed() => connection.graceful_shutdown(),
        }
    }
}

/// Answers 200, then sends back every byte received, beginning with `first` (received before
/// the answer).
async fn echo(mut recv: RecvStream, mut respond: SendResponse<Bytes>, first: Bytes) {
    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    if !first.is_empty() && send.send_data(first, false).is_err() {
        return;
    }
    while let Some(Ok(chunk)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// Answers 200, echoes the first bytes received, and resets the stream when more arrive.
async fn reset_after_echo(mut recv: RecvStream, mut respond: SendResponse<Bytes>) {
    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    if let Some(Ok(first)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(first.len());
        let _ = send.send_data(first, false);
    }
    if recv.data().await.is_some() {
        send.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// Waits for the stream's first bytes, then answers and echoes them and the rest.
async fn echo_after_data(mut recv: RecvStream, respond: SendResponse<Bytes>) {
    let Some(Ok(first)) = recv.data().await else {
        return;
    };
    let _ = recv.flow_control().release_capacity(first.len());
    echo(recv, respond, first).await;
}

/// A TCP listener that accepts connections, counts them and never says a word.
pub(crate) struct MuteListener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl MuteListener {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::<AtomicUsize>::default();
        let counted = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(tcp);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for MuteListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Completes the TLS handshake as an HBONE server, then never reads or writes again.
pub(crate) struct FrozenServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FrozenServer {
    pub(crate) async fn start(certificate: Arc<WorkloadCertificate>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(ambit_identity::server_config(&certificate)));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    held.push(tls);
                }
            }
        });
        Self { addr, task }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for FrozenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct DangerAcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerAcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
