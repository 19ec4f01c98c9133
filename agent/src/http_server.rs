//! The agent's small HTTP/1 servers (readiness, metrics, admin): each request is answered by a
//! handler that sees the request and the client's address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::accept::serve_listener;
use crate::drain::DrainWatcher;

/// A client that sends no complete request head within this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type Body = Full<Bytes>;

/// Answers requests; what each server of the agent implements.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Serves `handler` on `listener` until a drain starts.
pub(crate) async fn serve<H: Handler>(
    listener: TcpListener,
    drain: DrainWatcher,
    name: &'static str,
    handler: H,
) {
    let handler = Arc::new(handler);
    serve_listener(listener, drain, name, move |tcp, client, mut held| {
        let handler = handler.clone();
        async move {
            // `held` until the connection ends, so that a drain waits for it; a drain also asks
            // it to finish after the request in flight.
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(request, client).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = held.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(server = name, %client, %error, "HTTP connection failed");
            }
        }
    })
    .await;
}

/// A `text/plain` response.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.into().into())
}

/// A JSON response of `value`.
pub(crate) fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body.into()),
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

pub(crate) fn respond(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
