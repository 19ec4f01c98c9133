//! HTTP at the waypoint: the requests of an HTTP/1.1 or HTTP/2 connection, each decided by the
//! policies that target the waypoint or the Service (`403 RBAC: access denied` when denied, as
//! Envoy answers), else forwarded on the connection to the endpoint chosen for it; each counted
//! in Istio's request metrics and logged.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use ambit_identity::Identity;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, watch};

use crate::policy::{Connection, HttpRequest};
use crate::state::{AppProtocol, ClusterState, WaypointRef};
use crate::telemetry::{RequestMetrics, TrafficLabels};

/// What Envoy answers a request its RBAC filter denies.
const DENIED: &str = "RBAC: access denied";
/// How long an HTTP/1 client may take to send a request's headers: also how long an idle
/// keep-alive connection is held.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 clients are pinged this often when idle, and dropped when they do not answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What the requests of one connection share.
pub(super) struct Exchange {
    /// HTTP/1.1 or HTTP/2, as the Service port says.
    pub(super) protocol: AppProtocol,
    pub(super) waypoint: WaypointRef,
    pub(super) states: watch::Receiver<Arc<ClusterState>>,
    /// The Service the client addressed, `(namespace, name)`.
    pub(super) service: Option<(String, String)>,
    pub(super) source_ip: IpAddr,
    pub(super) source_identity: Option<Identity>,
    /// Where the client addressed the connection.
    pub(super) destination: SocketAddr,
    /// The connection's labels; each request adds its protocol and response code.
    pub(super) labels: TrafficLabels,
    pub(super) metrics: RequestMetrics,
}

/// The upstream connection's request sender.
enum Forward {
    /// HTTP/1.1 sends one request at a time.
    Http1(Mutex<hyper::client::conn::http1::SendRequest<Counted>>),
    Http2(hyper::client::conn::http2::SendRequest<Counted>),
}

impl Forward {
    async fn send(&self, request: Request<Counted>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => sender.clone().send_request(request).await,
        }
    }
}

/// Serves the client's requests on `downstream` and forwards them on `upstream`, both in the
/// exchange's protocol, until the client is done.
pub(super) async fn serve<D, U>(
    downstream: D,
    upstream: U,
    exchange: Exchange,
) -> Result<(), hyper::Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = exchange.protocol;
    let exchange = Arc::new(exchange);
    let (forward, upstream_connection) = match protocol {
        AppProtocol::Http2 => {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await?;
            (Forward::Http2(sender), tokio::spawn(connection))
        }
        AppProtocol::Http1 | AppProtocol::Tcp => {
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
            (Forward::Http1(Mutex::new(sender)), tokio::spawn(connection))
        }
    };
    let forward = Arc::new(forward);
    let service = service_fn(move |request| {
        let (exchange, forward) = (exchange.clone(), forward.clone());
        async move { Ok::<_, Infallible>(exchange.handle(request, &forward).await) }
    });
    let downstream = TokioIo::new(downstream);
    let served = match protocol {
        AppProtocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .serve_connection(downstream, service)
                .await
        }
        AppProtocol::Http1 | AppProtocol::Tcp => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(downstream, service)
                .await
        }
    };
    upstream_connection.abort();
    served
}

impl Exchange {
    /// Decides one request, and forwards it if allowed.
    async fn handle(
        &self,
        mut request: Request<Incoming>,
        forward: &Forward,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let protocol = if grpc { "grpc" } else { "http" };
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let refused = match malformed(&request) {
            Some(reason) => Some((StatusCode::BAD_REQUEST, reason, None)),
            None => match self.decide(&request) {
                Ok(()) => None,
                Err(policy) => Some((StatusCode::FORBIDDEN, DENIED, policy)),
            },
        };
        let (response, request_bytes) = match refused {
            Some((status, reason, policy)) => {
                let response = local_reply(status, reason, grpc);
                self.log(&method, &path, status, started, policy.as_deref());
                (response, None)
            }
            None => {
                let labels = |code| self.labels.request(protocol, code);
                strip_hop_by_hop(request.headers_mut());
                align_host(&mut request);
                // Observed once both the body has ended and the answer (its labels) is known.
                let request_bytes = Arc::new(Tally::default());
                let request = request.map(|body| Counted::new(body, request_bytes.clone()));
                let response = match forward.send(request).await {
                    Ok(mut response) => {
                        strip_hop_by_hop(response.headers_mut());
                        let code = response.status().as_u16();
                        let histogram = self.metrics.response_bytes.get_or_create(&labels(code));
                        let response_bytes = Arc::new(Tally::default());
                        response_bytes.observe_in(histogram.clone());
                        response.map(|body| Counted::new(body, response_bytes).boxed())
                    }
                    Err(error) => {
                        tracing::info!(%error, "the upstream failed the request");
                        local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
                            grpc,
                        )
                    }
                };
                self.log(&method, &path, response.status(), started, None);
                (response, Some(request_bytes))
            }
        };
        let labels = self.labels.request(protocol, response.status().as_u16());
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        let histogram = self.metrics.request_bytes.get_or_create(&labels).clone();
        match request_bytes {
            Some(tally) => tally.observe_in(histogram),
            // Refused before the body was read.
            None => histogram.observe(0.0),
        }
        response
    }

    /// Whether the policies allow `request`; the denying policy (or `None`) when not.
    fn decide(&self, request: &Request<Incoming>) -> Result<(), Option<String>> {
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers().get(http::header::HOST)?.to_str().ok())
            .unwrap_or_default();
        let http = HttpRequest {
            method: request.method().as_str(),
            path: request.uri().path(),
            host,
            headers: request.headers(),
        };
        let service = self
            .service
            .as_ref()
            .map(|(namespace, name)| (namespace.as_str(), name.as_str()));
        let client = Client {
            ip: self.source_ip,
            identity: self.source_identity.as_ref(),
        };
        decide(
            &self.states.borrow(),
            &self.waypoint,
            (service, self.destination),
            client,
            Some(&http),
        )
    }

    fn log(
        &self,
        method: &http::Method,
        path: &str,
        status: StatusCode,
        started: Instant,
        denied_by: Option<&str>,
    ) {
        tracing::info!(
            target: "access",
            direction = "waypoint",
            waypoint = %self.waypoint,
            src.addr = %self.source_ip,
            src.identity = self.source_identity.as_ref().map(tracing::field::display),
            dst.addr = %self.destination,
            method = %method,
            path,
            status = status.as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            policy = denied_by,
            "request"
        );
    }
}

/// Who is on the other end of a tunnel to the waypoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct Client<'a> {
    pub(super) ip: IpAddr,
    pub(super) identity: Option<&'a Identity>,
}

/// Whether the policies that target `waypoint` or the Service addressed (`namespace`, `name`)
/// allow `client` to reach `destination`, with `request` when it is HTTP: at L4 a rule with HTTP
/// fields fails closed. The denying policy, if one did, when not.
pub(super) fn decide(
    state: &ClusterState,
    waypoint: &WaypointRef,
    (service, destination): (Option<(&str, &str)>, SocketAddr),
    client: Client<'_>,
    request: Option<&HttpRequest<'_>>,
) -> Result<(), Option<String>> {
    let no_labels = BTreeMap::new();
    let connection = Connection {
        source_ip: client.ip,
        source_identity: client.identity,
        destination_ip: destination.ip(),
        destination_port: destination.port(),
        destination_namespace: service.map_or("", |(namespace, _)| namespace),
        destination_labels: &no_labels,
        destination_services: &[],
        destination_waypoints: &[],
        request,
    };
    let decision = state
        .authorization()
        .decide_at_waypoint(waypoint, service, &connection);
    if decision.allowed {
        Ok(())
    } else {
        Err(decision.policy.map(ToString::to_string))
    }
}

/// A response of the waypoint's own. To a gRPC client, as Envoy answers it: `200` with the
/// status and the message as `grpc-status` and `grpc-message`, and no body.
fn local_reply(status: StatusCode, message: &'static str, grpc: bool) -> Response<ProxyBody> {
    let body = if grpc { "" } else { message };
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    if !grpc {
        *response.status_mut() = status;
    }
    let headers = response.headers_mut();
    if grpc {
        // PERMISSION_DENIED, UNAVAILABLE, INVALID_ARGUMENT.
        let code = match status {
            StatusCode::FORBIDDEN => "7",
            StatusCode::SERVICE_UNAVAILABLE => "14",
            _ => "3",
        };
        let content_type = HeaderValue::from_static("application/grpc");
        headers.insert(http::header::CONTENT_TYPE, content_type);
        headers.insert("grpc-status", HeaderValue::from_static(code));
        headers.insert("grpc-message", HeaderValue::from_static(message));
    } else {
        let content_type = HeaderValue::from_static("text/plain");
        headers.insert(http::header::CONTENT_TYPE, content_type);
    }
    response
}

/// Why a request is refused before any policy sees it, if it is: the policies would decide on
/// something other than what the app gets. A path with dot segments or encoded separators: the
/// app would resolve `/public/../admin` to what a rule on `/admin*` protects.
fn malformed<B>(request: &Request<B>) -> Option<&'static str> {
    let path = request.uri().path();
    let lower = path.to_ascii_lowercase();
    let dot_segment = path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    let encoded = ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e));
    (dot_segment || encoded || path.contains('\\')).then_some("the path is not in normal form")
}

/// Makes `Host` say what the policies saw: a request that names its authority (HTTP/2, or an
/// HTTP/1 absolute form) is forwarded with that authority as its `Host`, whatever it sent.
fn align_host<B>(request: &mut Request<B>) {
    let authority = request
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    if let Some(authority) = authority
        && request.headers().contains_key(http::header::HOST)
    {
        request.headers_mut().insert(http::header::HOST, authority);
    }
}

/// Removes the headers that concern one hop only (RFC 9110, section 7.6.1), and those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    // `te: trailers` goes on: gRPC needs it end to end.
    if headers
        .get(http::header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(http::header::TE);
    }
}

/// The bytes of a body, observed in a histogram once the body has ended and the histogram is
/// known, whichever comes last: a request's labels hold its response's code.
#[derive(Default)]
struct Tally {
    bytes: AtomicU64,
    /// Whether the body has ended, and the histogram waiting for it.
    pending: std::sync::Mutex<(bool, Option<Histogram>)>,
}

impl Tally {
    fn pending(&self) -> std::sync::MutexGuard<'_, (bool, Option<Histogram>)> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn observe(&self, histogram: &Histogram) {
        histogram.observe(self.bytes.load(Ordering::Relaxed) as f64);
    }

    fn observe_in(&self, histogram: Histogram) {
        let mut pending = self.pending();
        if pending.0 {
            self.observe(&histogram);
        } else {
            pending.1 = Some(histogram);
        }
    }

    fn ended(&self) {
        let mut pending = self.pending();
        pending.0 = true;
        if let Some(histogram) = pending.1.take() {
            self.observe(&histogram);
        }
    }
}

/// A body whose bytes its tally counts as they pass.
struct Counted {
    inner: Incoming,
    tally: Arc<Tally>,
}

impl Counted {
    fn new(inner: Incoming, tally: Arc<Tally>) -> Self {
        Self { inner, tally }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            self.tally.bytes.fetch_add(n, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.tally.ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<()> {
        let mut request = Request::get(uri).body(()).unwrap();
        if let Some(host) = host {
            let host = HeaderValue::from_str(host).unwrap();
            request.headers_mut().insert(http::header::HOST, host);
        }
        request
    }

    #[test]
    fn paths_that_resolve_elsewhere_are_refused() {
        for path in [
            "/a/../admin",
            "/./admin",
            "/a/..",
            "/%2e%2e/admin",
            "/a%2Fb",
            "/a\\b",
        ] {
            assert!(malformed(&request(path, None)).is_some(), "{path}");
        }
        for path in ["/admin", "/a/b.c/d", "/..a/b", "/a?x=/../"] {
            assert_eq!(malformed(&request(path, None)), None, "{path}");
        }
    }

    #[test]
    fn the_host_forwarded_is_the_authority_decided_on() {
        let mut absolute = request("http://web.shop:80/x", Some("admin.shop"));
        align_host(&mut absolute);
        assert_eq!(absolute.headers()[http::header::HOST], "web.shop:80");
        let mut origin = request("/x", Some("web.shop"));
        align_host(&mut origin);
        assert_eq!(origin.headers()[http::header::HOST], "web.shop");
    }

    #[test]
    fn hop_by_hop_headers_stop_here() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(http::HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"]);
    }

    #[test]
    fn grpc_clients_are_answered_in_grpc() {
        let denied = local_reply(StatusCode::FORBIDDEN, DENIED, true);
        assert_eq!(denied.status(), StatusCode::OK);
        assert_eq!(denied.headers()["grpc-status"], "7");
        assert_eq!(denied.headers()["grpc-message"], DENIED);
        let plain = local_reply(StatusCode::FORBIDDEN, DENIED, false);
        assert_eq!(plain.status(), StatusCode::FORBIDDEN);
    }
}
