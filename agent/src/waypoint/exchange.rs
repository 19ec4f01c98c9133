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
use std::time::Instant;

use ambit_identity::Identity;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, watch};

use crate::policy::{Connection, HttpRequest};
use crate::state::{AppProtocol, ClusterState, WaypointRef};
use crate::telemetry::{RequestMetrics, TrafficLabels};

/// What Envoy answers a request its RBAC filter denies.
const DENIED: &str = "RBAC: access denied";

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
                .serve_connection(downstream, service)
                .await
        }
        AppProtocol::Http1 | AppProtocol::Tcp => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(downstream, service)
                .await
        }
    };
    upstream_connection.abort();
    served
}

impl Exchange {
    /// Decides one request, and forwards it if allowed.
    async fn handle(&self, request: Request<Incoming>, forward: &Forward) -> Response<ProxyBody> {
        let started = Instant::now();
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let protocol = if grpc { "grpc" } else { "http" };
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let (response, request_bytes) = match self.decide(&request).err() {
            Some(policy) => {
                let response = local_reply(StatusCode::FORBIDDEN, DENIED);
                self.log(
                    &method,
                    &path,
                    response.status(),
                    started,
                    policy.as_deref(),
                );
                (response, None)
            }
            None => {
                let labels = |code| self.labels.request(protocol, code);
                // Counted once the answer is known: bytes are observed under its code.
                let (parts, body) = request.into_parts();
                let counted = Counted::new(body);
                let request_bytes = counted.total.clone();
                let request = Request::from_parts(parts, counted);
                let response = match forward.send(request).await {
                    Ok(response) => {
                        let code = response.status().as_u16();
                        let histogram = self.metrics.response_bytes.get_or_create(&labels(code));
                        response.map(|body| Counted::observed(body, histogram.clone()).boxed())
                    }
                    Err(error) => {
                        tracing::info!(%error, "the upstream failed the request");
                        local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
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
        let sent = request_bytes.map_or(0, |total| total.load(Ordering::Relaxed));
        self.metrics
            .request_bytes
            .get_or_create(&labels)
            .observe(sent as f64);
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

/// A response of the waypoint's own.
fn local_reply(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// A body whose bytes are counted as they pass, observed in a histogram when it ends.
struct Counted {
    inner: Incoming,
    total: Arc<AtomicU64>,
    histogram: Option<Histogram>,
}

impl Counted {
    fn new(inner: Incoming) -> Self {
        Self {
            inner,
            total: Arc::default(),
            histogram: None,
        }
    }

    fn observed(inner: Incoming, histogram: Histogram) -> Self {
        Self {
            inner,
            total: Arc::default(),
            histogram: Some(histogram),
        }
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
            self.total.fetch_add(data.len() as u64, Ordering::Relaxed);
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
        if let Some(histogram) = &self.histogram {
            histogram.observe(self.total.load(Ordering::Relaxed) as f64);
        }
    }
}
