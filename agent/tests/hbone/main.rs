//! HBONE over loopback with real certificates, real TLS and real sockets.

mod peers;
mod pool;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use ambit_agent::authorize::{
    Authorizer, DenyReason, InboundRequest, Peers, RevokedFuture, Verdict,
};
use ambit_agent::sockets::LocalSockets;
use ambit_agent::{ClientSettings, ConnectError, Keepalive};
use ambit_identity::PeerVerifyError;
use ambit_test_support::{EchoServer, SharedBuffer, TestPki, refused_addr};
use bytes::Bytes;
use http::{Method, StatusCode};
use peers::{Mesh, h2_frame_types, raw_h2, server_verdict, tls_client};
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn bytes_round_trip_through_the_tunnel() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start().await;
    let mut app = mesh.open(echo.addr()).await.unwrap();

    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|_| fastrand::u8(..)).collect();
    let (mut read, mut write) = app.split();
    let writer = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let reader = read.read_to_end(&mut echoed);
    let ((), read_result) = tokio::join!(writer, reader);
    read_result.unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
}

#[tokio::test]
async fn a_hundred_streams_share_a_connection_and_the_next_dials_another() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start().await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(mesh.open(echo.addr()).await.unwrap());
    }
    assert_eq!(mesh.client.pooled_connections(), 1);

    let mut extra = mesh.open(echo.addr()).await.unwrap();
    assert_eq!(mesh.client.pooled_connections(), 2);
    extra.write_all(b"ping").await.unwrap();
    let mut reply = [0; 4];
    extra.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"ping");
}

#[tokio::test]
async fn concurrent_first_requests_share_one_dial() {
    let mesh = Arc::new(Mesh::start().await);
    let echo = EchoServer::start().await;
    let opens: Vec<_> = (0..50)
        .map(|_| {
            let (mesh, addr) = (mesh.clone(), echo.addr());
            tokio::spawn(async move { mesh.open(addr).await.unwrap() })
        })
        .collect();
    let mut held = Vec::new();
    for open in opens {
        held.push(open.await.unwrap());
    }
    assert_eq!(mesh.client.pooled_connections(), 1);
}

#[tokio::test]
async fn idle_connections_leave_the_pool() {
    let settings = ClientSettings {
        idle_timeout: Duration::from_millis(100),
        ..ClientSettings::default()
    };
    let mesh = Mesh::start_with(settings).await;
    let echo = EchoServer::start().await;
    let app = mesh.open(echo.addr()).await.unwrap();
    assert_eq!(mesh.client.pooled_connections(), 1);
    drop(app);
    peers::eventually(|| mesh.client.pooled_connections() == 0).await;
}

/// The app reads nothing: the writer must stall once the windows and socket buffers are full,
/// instead of the agent buffering everything it is sent.
#[tokio::test]
async fn a_slow_reader_stalls_the_writer() {
    const ATTEMPT: usize = 256 * 1024 * 1024;
    // Stream window (4 MiB), h2's send buffer, and the kernel buffers of four sockets.
    const BOUND: usize = 48 * 1024 * 1024;

    let mesh = Mesh::start().await;
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let mut app = mesh.open(sink_addr).await.unwrap();
    let (mut sink_conn, _) = sink.accept().await.unwrap();

    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0;
    while written < ATTEMPT {
        match tokio::time::timeout(Duration::from_millis(500), app.write_all(&chunk)).await {
            Ok(result) => {
                result.unwrap();
                written += chunk.len();
            }
            Err(_) => break,
        }
    }
    assert!(
        written < BOUND,
        "wrote {written} bytes to a reader that reads nothing"
    );

    // Once the app reads, everything written arrives: stalled, not stuck.
    let mut received = 0;
    let mut buf = vec![0; 1024 * 1024];
    while received < written {
        received += sink_conn.read(&mut buf).await.unwrap();
    }
}

#[tokio::test]
async fn plaintext_to_the_hbone_port_gets_no_http_answer() {
    let mesh = Mesh::start().await;
    let mut tcp = TcpStream::connect(mesh.server_addr).await.unwrap();
    tcp.write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "expected nothing or a TLS alert, got {answer:?}"
    );
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    let mesh = Mesh::start().await;
    let cert = mesh.pki.certificate(&mesh.client_identity);
    let config = tls_client(Some(&cert), &[&rustls::version::TLS12]);
    let alert = server_verdict(config, mesh.server_addr).await.unwrap_err();
    assert_eq!(alert, AlertDescription::ProtocolVersion);
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let mesh = Mesh::start().await;
    let config = tls_client(None, &[&rustls::version::TLS13]);
    let alert = server_verdict(config, mesh.server_addr).await.unwrap_err();
    assert_eq!(alert, AlertDescription::CertificateRequired);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::start().await;
    let other_ca = TestPki::new(mesh.pki.trust_domain().as_str());
    let cert = other_ca.certificate(&mesh.client_identity);
    let config = tls_client(Some(&cert), &[&rustls::version::TLS13]);
    let alert = server_verdict(config, mesh.server_addr).await.unwrap_err();
    // Both roots have the same subject, so the chain finds an issuer whose signature fails.
    assert!(
        matches!(
            alert,
            AlertDescription::UnknownCA | AlertDescription::DecryptError
        ),
        "{alert:?}"
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_trust_domain_is_refused() {
    let mesh = Mesh::start().await;
    let foreign: ambit_identity::Identity =
        "spiffe://evil.example/ns/shop/sa/frontend".parse().unwrap();
    // Same CA, so only the trust-domain check can refuse it.
    let cert = mesh.pki.certificate(&foreign);
    let config = tls_client(Some(&cert), &[&rustls::version::TLS13]);
    let alert = server_verdict(config, mesh.server_addr).await.unwrap_err();
    assert_eq!(alert, AlertDescription::CertificateUnknown);

    // The client side agrees: the HBONE client gets a handshake error, not a tunnel.
    let client = ambit_agent::HboneClient::new(mesh.pki.manager(), ClientSettings::default());
    let mut request = mesh.request(EchoServer::start().await.addr());
    request.source = foreign;
    let err = client
        .connect(&request, &LocalSockets, &mut Bytes::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::H2Handshake { .. } | ConnectError::OpenStream { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_with_an_unexpected_identity_is_refused() {
    let mesh = Mesh::start().await;
    let mut request = mesh.request(EchoServer::start().await.addr());
    request.expected_identities = vec![mesh.pki.identity("shop", "payments")];
    let err = mesh
        .client
        .connect(&request, &LocalSockets, &mut Bytes::new())
        .await
        .unwrap_err();
    let ConnectError::Tls { source, .. } = &err else {
        panic!("expected a TLS error, got {err}");
    };
    let verify = source
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<PeerVerifyError>()
            }
            _ => None,
        });
    assert!(
        matches!(verify, Some(PeerVerifyError::SanMismatch { presented, .. }) if *presented == mesh.server_identity),
        "{err}: {:?}",
        source.source()
    );
}

#[tokio::test]
async fn requests_that_are_not_a_valid_connect_get_400() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start().await;
    let mut h2 = raw_h2(&mesh).await;
    let cases = [
        (Method::GET, echo.addr().to_string()),
        (Method::POST, echo.addr().to_string()),
        (Method::CONNECT, "example.com:80".to_owned()),
        (Method::CONNECT, "127.0.0.1".to_owned()),
        // Not the workload this connection arrived at.
        (Method::CONNECT, format!("127.0.0.2:{}", echo.addr().port())),
    ];
    for (method, authority) in cases {
        let status = peers::send(&mut h2, method.clone(), &authority).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {authority}");
    }
}

#[tokio::test]
async fn unreachable_destinations_get_503() {
    let mesh = Mesh::start().await;
    let refused = refused_addr().await;
    for destination in [refused, "127.0.0.1:15008".parse().unwrap()] {
        let err = mesh
            .client
            .connect(&mesh.request(destination), &LocalSockets, &mut Bytes::new())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConnectError::Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    ..
                }
            ),
            "{destination}: {err}"
        );
    }
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn garbage_frames_end_the_connection_with_goaway() {
    let mesh = Mesh::start().await;
    let cert = mesh.pki.certificate(&mesh.client_identity);
    let config = ambit_identity::client_config(&cert, std::slice::from_ref(&mesh.server_identity));
    let tcp = TcpStream::connect(mesh.server_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(mesh.server_addr.ip().into(), tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A SETTINGS frame on stream 7 (settings belong to stream 0), then noise.
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 7]).await.unwrap();
    tls.write_all(&[0xff; 64]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(
        h2_frame_types(&answer).contains(&7),
        "no GOAWAY in {answer:?}"
    );
    mesh.assert_still_serving().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let pki = TestPki::new("cluster.local");
    let server_identity = pki.identity("shop", "backend");
    let frozen = peers::FrozenServer::start(pki.certificate(&server_identity)).await;
    let settings = ClientSettings {
        keepalive: Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        },
        ..ClientSettings::default()
    };
    let mesh = Mesh::with_pki(pki, settings).await;
    let mut request = mesh.request(frozen.addr());
    request.hbone_addr = frozen.addr();
    let err = mesh
        .client
        .connect(&request, &LocalSockets, &mut Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::OpenStream { .. }), "{err}");
    peers::eventually(|| mesh.client.pooled_connections() == 0).await;
}

/// Denies everything, as a policy would.
#[derive(Debug)]
struct DenyAll;

impl Authorizer for DenyAll {
    fn authorize(&self, _: &InboundRequest) -> Verdict {
        Verdict::Deny {
            policy: Some("shop/deny-all".into()),
            reason: DenyReason::Authorization,
        }
    }

    fn revoked(&self, _: InboundRequest) -> RevokedFuture {
        Box::pin(std::future::pending())
    }

    fn peers(&self, _: &InboundRequest) -> Peers {
        Peers::default()
    }
}

#[tokio::test]
async fn a_denied_stream_gets_401_and_never_reaches_the_app() {
    let pki = TestPki::new("cluster.local");
    let mesh = Mesh::with_authorizer(pki, ClientSettings::default(), Arc::new(DenyAll)).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The client's first bytes, sent with the request: they reach nothing either.
    let err = mesh
        .client
        .connect(
            &mesh.request(listener.local_addr().unwrap()),
            &LocalSockets,
            &mut Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ),
        "{err}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the app was reached");
}

/// Both ends' access-log lines name the trace of the tunnel's `traceparent`.
#[tokio::test]
async fn the_inbound_access_log_carries_the_trace_id() {
    let lines = SharedBuffer::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test's runtime has one thread: the server's tasks log through this subscriber.
    let _logging = tracing::subscriber::set_default(subscriber);
    let mesh = Mesh::start().await;
    let echo = EchoServer::start().await;
    let mut app = mesh.open(echo.addr()).await.unwrap();
    app.shutdown().await.unwrap();
    app.read_to_end(&mut Vec::new()).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let inbound = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no inbound access-log line"
        );
        let text = lines.text();
        if let Some(line) = text.lines().find(|l| l.contains("direction=\"inbound\"")) {
            break line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        inbound.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
        "{inbound}"
    );
}
