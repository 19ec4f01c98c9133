//! One client connection: the TLS handshake, bounded in time, then gRPC over HTTP/2 until the
//! client leaves or the server stops.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::Service;

use super::service::CertificateService;
use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;

/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight on one connection; a node agent renews a handful at a time.
const MAX_CONCURRENT_STREAMS: u32 = 64;
/// A token is about a kilobyte; this leaves room for any real client's headers.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// A connection is closed gracefully this long after it was accepted (clients reconnect at
/// their next request), so that one that never sends a request holds its slot for no longer.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(10 * 60);
/// How long the requests in flight get once the connection is past its age.
const AGE_GRACE: Duration = Duration::from_secs(10);
/// Node agents keep their connection open between renewals; pings find those whose node went
/// away, which would otherwise hold a connection for ever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The client's address, in each request's extensions for the service's log lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Serves `tcp` from `client` until it closes; once `stop` resolves, the requests in flight
/// are finished and the connection closed.
pub(crate) async fn serve(
    tls: &TlsAcceptor,
    grpc: IstioCertificateServiceServer<CertificateService>,
    tcp: TcpStream,
    client: SocketAddr,
    stop: impl Future<Output = ()>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(src.addr = %client, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(src.addr = %client, "TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(ClientAddr(client));
        grpc.clone().call(request)
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = stop => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(AGE_GRACE, connection).await {
                Ok(served) => served,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = served {
        tracing::debug!(src.addr = %client, %error, "connection failed");
    }
}
