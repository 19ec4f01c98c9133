//! The client's connection pool against peers that misbehave: GOAWAY, refused streams, dials
//! that never finish, servers that never answer, connections that grew too old.

#![expect(
    clippy::unwrap_used,
    reason = "a helper whose peer misbehaves unexpectedly fails the test"
)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_agent::sockets::LocalSockets;
use ambit_agent::{
    ClientSettings, ConnectError, CopyError, DialStage, EarlyBytes, Transferred, Tunnel,
};
use ambit_test_support::TestPki;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::peers::{self, Answer, H2_SERVER_MAX_STREAMS, H2Server, Mesh, MuteListener};

/// Opens a tunnel through the HBONE server at `hbone`, with `early` sent along.
async fn tunnel_via(
    mesh: &Mesh,
    hbone: SocketAddr,
    mut early: Bytes,
) -> Result<Tunnel, ConnectError> {
    let mut request = mesh.request(hbone);
    request.hbone_addr = hbone;
    mesh.client
        .connect(&request, &LocalSockets, &mut early)
        .await
}

/// Opens a tunnel through the HBONE server at `hbone` and returns the app's end of it.
async fn open_via(mesh: &Mesh, hbone: SocketAddr) -> Result<TcpStream, ConnectError> {
    let tunnel = tunnel_via(mesh, hbone, Bytes::new()).await?;
    Ok(peers::carry(tunnel).await)
}

async fn assert_echoes(app: &mut TcpStream) {
    app.write_all(b"ping").await.unwrap();
    let mut reply = [0; 4];
    app.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"ping");
}

async fn h2_server(mesh: &Mesh, answer: Answer) -> H2Server {
    H2Server::start(mesh.pki.manager(), mesh.server_identity.clone(), answer).await
}

#[tokio::test]
async fn a_connection_that_said_goaway_takes_no_new_stream() {
    let mesh = Mesh::start().await;
    let server = h2_server(&mesh, Answer::Echo).await;
    let mut held = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut held).await;

    server.goaway();
    // The echo comes back on the connection after its GOAWAY.
    assert_echoes(&mut held).await;
    let mut fresh = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut fresh).await;
    assert_eq!(server.accepted(), 2);
    assert_eq!(mesh.client.pooled_connections(), 1);
    assert_eq!(mesh.client.pooled_streams(), 2);

    // The stream opened before the GOAWAY finishes; then its connection closes.
    assert_echoes(&mut held).await;
    drop(held);
    peers::eventually(|| server.open() == 1).await;
    assert_eq!(mesh.client.pooled_streams(), 1);
}

#[tokio::test]
async fn a_server_allowing_fewer_streams_gets_another_connection_at_its_limit() {
    let mesh = Mesh::start().await;
    let server = h2_server(&mesh, Answer::Echo).await;
    let mut held = Vec::new();
    for _ in 0..=H2_SERVER_MAX_STREAMS {
        let mut app = open_via(&mesh, server.addr()).await.unwrap();
        // Answered at once: no stream waits for a slot on a full connection.
        tokio::time::timeout(Duration::from_secs(5), assert_echoes(&mut app))
            .await
            .unwrap();
        held.push(app);
    }
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn a_refused_stream_is_retried_once_on_a_new_connection() {
    let mesh = Mesh::start().await;
    let server = h2_server(&mesh, Answer::RefuseOnFirst(1)).await;
    let mut app = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut app).await;
    assert_eq!(server.accepted(), 2);
    assert_eq!(mesh.client.pooled_connections(), 1);

    let refusing = h2_server(&mesh, Answer::RefuseOnFirst(usize::MAX)).await;
    let err = open_via(&mesh, refusing.addr()).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::OpenStream { source, .. } if source.reason() == Some(h2::Reason::REFUSED_STREAM)),
        "{err}"
    );
    assert_eq!(refusing.accepted(), 2, "one attempt and one retry");
}

/// Opens a tunnel to `server` with `early` sent along, and reads the echo of `early` back; with
/// the copy's outcome once both sides have closed.
async fn open_early(
    mesh: &Mesh,
    server: &H2Server,
    early: &'static [u8],
) -> (TcpStream, JoinHandle<Result<Transferred, CopyError>>) {
    let tunnel = tunnel_via(mesh, server.addr(), Bytes::from_static(early))
        .await
        .unwrap();
    let (mut app, copy) = peers::carry_counted(tunnel).await;
    let mut echoed = vec![0; early.len()];
    let read = tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut echoed)).await;
    assert!(read.is_ok(), "the early bytes never came back");
    read.unwrap().unwrap();
    assert_eq!(echoed, early);
    (app, copy)
}

#[tokio::test]
async fn early_bytes_go_with_the_request_before_its_answer() {
    let mesh = Mesh::start().await;
    // Answers once bytes arrived: a client that waited for the answer first would time out.
    let server = h2_server(&mesh, Answer::EchoAfterData).await;
    let (mut app, copy) = open_early(&mesh, &server, b"hello").await;
    assert_echoes(&mut app).await;
    app.shutdown().await.unwrap();
    app.read_to_end(&mut Vec::new()).await.unwrap();
    let copied = copy.await.unwrap().unwrap();
    assert_eq!(copied.sent, 9, "the early bytes count as the app's");
    assert_eq!(copied.received, 9);
}

/// Bytes a client sends while the connection its tunnel goes on is being dialed.
struct SentDuringDial(Arc<Mutex<Bytes>>);

impl EarlyBytes for SentDuringDial {
    fn take_early(&mut self) -> io::Result<Bytes> {
        Ok(std::mem::take(&mut *self.0.lock().unwrap()))
    }
}

#[tokio::test]
async fn early_bytes_sent_while_the_connection_is_dialed_go_with_the_request() {
    let settings = ClientSettings {
        response_timeout: Duration::from_secs(3),
        ..ClientSettings::default()
    };
    let mesh = Mesh::start_with(settings).await;
    let server = h2_server(&mesh, Answer::EchoAfterData).await;
    // Holds the dial at its TLS handshake until the client has sent its bytes.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (dialing, dial_started) = tokio::sync::oneshot::channel();
    let gate = Arc::new(tokio::sync::Notify::new());
    let opened = gate.clone();
    let server_addr = server.addr();
    tokio::spawn(async move {
        let (mut dialed, _) = relay.accept().await.unwrap();
        dialing.send(()).unwrap();
        opened.notified().await;
        let mut upstream = TcpStream::connect(server_addr).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut dialed, &mut upstream).await;
    });

    let sent = Arc::new(Mutex::new(Bytes::new()));
    let mut early = SentDuringDial(sent.clone());
    let mut request = mesh.request(relay_addr);
    request.hbone_addr = relay_addr;
    let send_during_dial = async {
        dial_started.await.unwrap();
        *sent.lock().unwrap() = Bytes::from_static(b"hello");
        gate.notify_one();
    };
    let (tunnel, ()) = tokio::join!(
        mesh.client.connect(&request, &LocalSockets, &mut early),
        send_during_dial
    );
    // Taken before the dial, the bytes would have gone after an answer that never came.
    let (mut app, copy) = peers::carry_counted(tunnel.unwrap()).await;
    let mut echoed = [0; 5];
    app.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello");
    app.shutdown().await.unwrap();
    app.read_to_end(&mut Vec::new()).await.unwrap();
    let copied = copy.await.unwrap().unwrap();
    assert_eq!((copied.sent, copied.received), (5, 5));
}

#[tokio::test]
async fn a_stream_reset_by_the_server_resets_the_app_connection() {
    let mesh = Mesh::start().await;
    let server = h2_server(&mesh, Answer::ResetAfterEcho).await;
    let mut app = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut app).await;
    app.write_all(b"more").await.unwrap();
    // A clean end of stream instead would pass a cut-off answer for a complete one.
    let read = app.read(&mut [0; 8]).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn early_bytes_go_again_with_a_retried_stream() {
    let mesh = Mesh::start().await;
    let server = h2_server(&mesh, Answer::RefuseOnFirst(1)).await;
    let (mut app, _) = open_early(&mesh, &server, b"hello").await;
    assert_echoes(&mut app).await;
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn a_failed_dial_fails_everyone_waiting_for_it() {
    let settings = ClientSettings {
        connect_timeout: Duration::from_millis(500),
        ..ClientSettings::default()
    };
    let mesh = Arc::new(Mesh::start_with(settings).await);
    // Accepts TCP and never speaks TLS: the dial is stuck in the TLS handshake.
    let mute = MuteListener::start().await;
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let (mesh, addr) = (mesh.clone(), mute.addr());
            tokio::spawn(async move { open_via(&mesh, addr).await.map(drop) })
        })
        .collect();
    let mut errors = Vec::new();
    for open in opens {
        let result = tokio::time::timeout(Duration::from_secs(10), open).await;
        errors.push(result.unwrap().unwrap().unwrap_err());
    }
    let shared: Vec<_> = errors
        .iter()
        .map(|err| match err {
            ConnectError::SharedDial { source, .. } => source.clone(),
            other => panic!("expected the shared dial's error, got {other}"),
        })
        .collect();
    assert!(
        matches!(
            *shared[0],
            ConnectError::DialTimeout {
                stage: DialStage::TlsHandshake,
                ..
            }
        ),
        "{}",
        shared[0]
    );
    assert!(shared.iter().all(|s| Arc::ptr_eq(s, &shared[0])));
    assert_eq!(mute.accepted(), 1);
    assert_eq!(mesh.client.pool_keys(), 0);

    // A caller after the failure dials afresh, and alone gets the error itself.
    let err = open_via(&mesh, mute.addr()).await.unwrap_err();
    assert!(matches!(err, ConnectError::DialTimeout { .. }), "{err}");
    assert_eq!(mute.accepted(), 2);
    assert_eq!(mesh.client.pool_keys(), 0);
}

#[tokio::test]
async fn a_connect_without_answer_fails_at_the_response_deadline() {
    let timeout = Duration::from_millis(300);
    let settings = ClientSettings {
        response_timeout: timeout,
        ..ClientSettings::default()
    };
    let mesh = Mesh::start_with(settings).await;
    let server = h2_server(&mesh, Answer::Silent).await;
    let open = open_via(&mesh, server.addr());
    let err = tokio::time::timeout(Duration::from_secs(10), open)
        .await
        .expect("the open gave up")
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::ResponseTimeout { timeout: t, .. } if t == timeout),
        "{err}"
    );
}

#[tokio::test]
async fn an_old_connection_takes_no_new_stream_but_finishes_its_own() {
    let settings = ClientSettings {
        max_connection_age: Duration::from_millis(300),
        ..ClientSettings::default()
    };
    let mesh = Mesh::start_with(settings).await;
    let server = h2_server(&mesh, Answer::Echo).await;
    let mut held = open_via(&mesh, server.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let mut fresh = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut fresh).await;
    assert_eq!(server.accepted(), 2);
    assert_eq!(mesh.client.pooled_connections(), 1);
    assert_echoes(&mut held).await;
    drop(held);
    peers::eventually(|| server.open() == 1).await;
}

#[tokio::test]
async fn a_connection_does_not_outlive_its_certificates() {
    let pki = TestPki::with_ttl("cluster.local", Duration::from_secs(3));
    let mesh = Mesh::with_pki(pki, ClientSettings::default()).await;
    let server = h2_server(&mesh, Answer::Echo).await;
    let mut held = open_via(&mesh, server.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let mut fresh = open_via(&mesh, server.addr()).await.unwrap();
    assert_echoes(&mut fresh).await;
    assert_eq!(server.accepted(), 2);
    assert_echoes(&mut held).await;
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_before_the_app() {
    let mesh = Mesh::start().await;
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2 = peers::raw_h2(&mesh).await;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(app.local_addr().unwrap().to_string())
        .header("x-padding", "x".repeat(100 * 1024))
        .body(())
        .unwrap();
    let (response, _send) = h2
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    // One HEADERS frame (the server allows 1 MiB frames): h2 answers 431 for that stream.
    let response = response.await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), app.accept()).await;
    assert!(accepted.is_err(), "the app was reached");
    mesh.assert_still_serving().await;
}
