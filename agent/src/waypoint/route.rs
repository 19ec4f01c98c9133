//! Where the waypoint sends each tunnel: to an endpoint of what the client addressed (a
//! Service's VIP and port, or a pod's address), when that is bound to this waypoint. Anything
//! else is refused: a waypoint is no open relay.

use std::error::Error;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use ambit_identity::Identity;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::access::TraceId;
use crate::balance::{Balancer, Lease};
use crate::error_chain::ErrorChain;
use crate::hbone::{
    self, ConnectRequest, H2Io, H2Stream, HboneClient, Peer, StreamHandler, TraceParent, reply,
};
use crate::sockets::{self, LocalSockets};
use crate::state::{AppProtocol, ClusterState, Service, Upstream, WaypointRef};
use crate::telemetry::{Reporter, RequestMetrics, Telemetry, TrafficLabels};

use super::exchange::{self, Client, Exchange};

/// Routes the tunnels of one waypoint.
#[derive(Debug)]
pub(super) struct Router {
    pub(super) waypoint: WaypointRef,
    /// What the waypoint proves, to its clients and to the endpoints.
    pub(super) identity: Identity,
    pub(super) states: watch::Receiver<Arc<ClusterState>>,
    pub(super) balancer: Arc<Balancer>,
    pub(super) client: HboneClient,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) requests: RequestMetrics,
}

/// Where one tunnel goes.
struct Route {
    upstream: Upstream,
    lease: Option<Lease>,
    /// The Service the client addressed, if it did.
    service: Option<Arc<Service>>,
    /// What the addressed port carries: HTTP is served request by request.
    protocol: AppProtocol,
    /// The labels of the connection (for its requests' metrics).
    labels: TrafficLabels,
}

impl StreamHandler for Router {
    fn serve(
        self: Arc<Self>,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: Arc<Peer>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.carry(request, respond, peer))
    }
}

impl Router {
    /// Routes one tunnel, answers it, and carries it until both sides close.
    async fn carry(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Arc<Peer>,
    ) {
        let started = Instant::now();
        let src_identity = peer.identity.as_ref().map(ToString::to_string);
        let authority = match hbone::authority(&request) {
            Ok(authority) => authority,
            Err(error) => {
                tracing::info!(src.addr = %peer.addr, src.identity = src_identity, %error, "refused CONNECT");
                return reply(&mut respond, error.status());
            }
        };
        // The client's trace, continued upstream: the lines of both agents and of the waypoint
        // join on its id.
        let trace = hbone::trace(&request).map_or_else(TraceParent::random, TraceParent::next_hop);
        let log = |endpoint: Option<SocketAddr>, bytes: (u64, u64), error: Option<String>| {
            tracing::info!(
                target: "access",
                direction = "waypoint",
                waypoint = %self.waypoint,
                src.addr = %peer.addr,
                src.identity = src_identity,
                dst.addr = %authority,
                dst.endpoint = endpoint.map(tracing::field::display),
                trace_id = %TraceId(trace.trace_id),
                bytes_sent = bytes.0,
                bytes_received = bytes.1,
                duration_ms = started.elapsed().as_millis() as u64,
                error,
                "connection closed"
            );
        };
        let Some(route) = self.route(authority, &peer) else {
            reply(&mut respond, StatusCode::BAD_REQUEST);
            let error = format!("{authority} is no Service or pod behind this waypoint");
            return log(None, (0, 0), Some(error));
        };
        // HTTP is decided request by request; anything else here, and again when the policies
        // change.
        let decided = || {
            let state = self.states.borrow();
            self.decide(&state, route.service.as_deref(), &peer, authority)
        };
        if route.protocol == AppProtocol::Tcp
            && let Err(policy) = decided()
        {
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            let error = format!(
                "denied by {}",
                policy
                    .as_deref()
                    .unwrap_or("the ALLOW policies, none of which matched")
            );
            return log(None, (0, 0), Some(error));
        }
        let endpoint = route.lease.as_ref().map(Lease::endpoint);
        let carry = match self.exchange(&route, &peer, authority) {
            Some(exchange) => Carry::Requests(Box::new(exchange)),
            None => Carry::Bytes(self.revoked(&route, &peer, authority)),
        };
        let recv = request.into_body();
        let carried = match route.upstream {
            Upstream::Hbone {
                workload,
                hbone_addr,
                authority: target,
            } => {
                let expected = workload.identity(self.identity.trust_domain());
                let connect = ConnectRequest {
                    source: self.identity.clone(),
                    source_addr: SocketAddr::new(peer.local_ip, 0),
                    hbone_addr,
                    authority: target,
                    service: route.service.as_ref().map(|s| s.hostname.clone()),
                    expected_identities: expected.into_iter().collect(),
                    baggage: None,
                    trace,
                };
                match self
                    .client
                    .connect(&connect, &LocalSockets, &mut Bytes::new())
                    .await
                {
                    Ok(tunnel) => {
                        let (upstream, _claim) = tunnel.into_io();
                        answer(respond, recv, upstream, route.lease, carry).await
                    }
                    Err(error) => {
                        let fault = error.is_server_fault(false);
                        refuse(respond, route.lease, error, fault)
                    }
                }
            }
            Upstream::Passthrough { addr } => {
                let local = SocketAddr::new(peer.local_ip, 0);
                match sockets::connect(&LocalSockets, local, false, addr).await {
                    Ok(upstream) => answer(respond, recv, upstream, route.lease, carry).await,
                    Err(error) => {
                        let fault = sockets::is_unreachable(&error);
                        refuse(respond, route.lease, error, fault)
                    }
                }
            }
            Upstream::NoEndpoint { service, port } => {
                let error = format!("service {service} has no ready endpoint for port {port}");
                Err(refuse_with(respond, error))
            }
            Upstream::NoWaypoint { waypoint, reason } => {
                let error = format!("waypoint {waypoint}: {reason}");
                Err(refuse_with(respond, error))
            }
        };
        match carried {
            Ok(bytes) => log(endpoint, bytes, None),
            Err(error) => log(endpoint, (0, 0), Some(error)),
        }
    }

    /// Where a tunnel from `peer` to `authority` goes, when this waypoint fronts it.
    fn route(&self, authority: SocketAddr, peer: &Peer) -> Option<Route> {
        let state = self.states.borrow();
        let service = state.addressed_service(authority).cloned();
        let bound = match &service {
            Some(service) => service.waypoint.as_ref(),
            None => state
                .workload_by_ip(authority.ip())
                .and_then(|w| w.waypoint.as_ref()),
        };
        if bound != Some(&self.waypoint) {
            return None;
        }
        let (upstream, lease) = state.resolve_direct(authority, &self.balancer);
        let protocol = service
            .as_ref()
            .and_then(|s| s.ports.iter().find(|p| p.port == authority.port()))
            .map_or(AppProtocol::Tcp, |p| p.protocol);
        // The client is named only when the identity it proved is its own.
        let source = state.workload_by_ip(peer.addr.ip()).filter(|w| {
            peer.identity.as_ref().is_some_and(|proved| {
                w.identity(proved.trust_domain())
                    .is_ok_and(|expected| expected == *proved)
            })
        });
        let destination = match &upstream {
            Upstream::Hbone { workload, .. } => Some(workload.clone()),
            Upstream::Passthrough { addr } => state.workload_by_ip(addr.ip()).cloned(),
            Upstream::NoEndpoint { .. } | Upstream::NoWaypoint { .. } => None,
        };
        let destination_identity = destination
            .as_ref()
            .and_then(|w| w.identity(self.identity.trust_domain()).ok());
        let labels = TrafficLabels::new(
            Reporter::Destination,
            &self.telemetry.cluster,
            (source.map(AsRef::as_ref), peer.identity.as_ref()),
            (destination.as_deref(), destination_identity.as_ref()),
            service.as_deref(),
        );
        Some(Route {
            upstream,
            lease,
            service,
            protocol,
            labels,
        })
    }

    /// Whether the policies allow a connection from `peer` on `route`, at L4.
    fn decide(
        &self,
        state: &ClusterState,
        service: Option<&Service>,
        peer: &Peer,
        authority: SocketAddr,
    ) -> Result<(), Option<String>> {
        let service = service.map(|s| (s.namespace.as_str(), s.name.as_str()));
        let client = Client {
            ip: peer.addr.ip(),
            identity: peer.identity.as_ref(),
        };
        exchange::decide(state, &self.waypoint, (service, authority), client, None)
    }

    /// Resolves once a policy change denies a connection from `peer` on `route`: an open
    /// connection is held to the policies in force, as the node agent holds its own.
    fn revoked(
        self: &Arc<Self>,
        route: &Route,
        peer: &Arc<Peer>,
        authority: SocketAddr,
    ) -> Revoked {
        let (router, peer, service) = (self.clone(), peer.clone(), route.service.clone());
        let mut states = self.states.clone();
        Box::pin(async move {
            while states.changed().await.is_ok() {
                let state = states.borrow_and_update().clone();
                if router
                    .decide(&state, service.as_deref(), &peer, authority)
                    .is_err()
                {
                    return;
                }
            }
            // The source stopped: nothing changes any more.
            std::future::pending().await
        })
    }

    /// What the requests of a connection on `route` share, when it carries HTTP.
    fn exchange(&self, route: &Route, peer: &Peer, authority: SocketAddr) -> Option<Exchange> {
        if route.protocol == AppProtocol::Tcp {
            return None;
        }
        Some(Exchange {
            protocol: route.protocol,
            waypoint: self.waypoint.clone(),
            states: self.states.clone(),
            service: route
                .service
                .as_ref()
                .map(|s| (s.namespace.clone(), s.name.clone())),
            source_ip: peer.addr.ip(),
            source_identity: peer.identity.clone(),
            destination: authority,
            labels: route.labels.clone(),
            metrics: self.requests.clone(),
        })
    }
}

/// Resolves when a policy change denies an open connection.
type Revoked = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a tunnel is carried: request by request, or as bytes until a policy change denies it.
enum Carry {
    Requests(Box<Exchange>),
    Bytes(Revoked),
}

/// Answers the tunnel, then serves its HTTP requests on `upstream`, or copies bytes between the
/// two until both close or a policy change denies it: the bytes each way (`0` for HTTP, counted
/// by request), or why it ended early.
async fn answer<U: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut respond: SendResponse<Bytes>,
    recv: RecvStream,
    mut upstream: U,
    lease: Option<Lease>,
    carry: Carry,
) -> Result<(u64, u64), String> {
    if let Some(lease) = &lease {
        lease.succeeded();
    }
    let send = respond
        .send_response(Response::new(()), false)
        .map_err(|e| ErrorChain(&e).to_string())?;
    let mut downstream = H2Io::new(H2Stream { send, recv });
    match carry {
        Carry::Requests(exchange) => exchange::serve(downstream, upstream, *exchange)
            .await
            .map(|()| (0, 0))
            .map_err(|e| ErrorChain(&e).to_string()),
        Carry::Bytes(revoked) => tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {
                copied.map_err(|e| ErrorChain(&e).to_string())
            }
            () = revoked => Err("closed: a policy change denies it".to_owned()),
        },
    }
}

/// The endpoint could not be reached: the client is told, and the endpoint ejected when that
/// is its `fault`.
fn refuse(
    respond: SendResponse<Bytes>,
    lease: Option<Lease>,
    error: impl Error + 'static,
    fault: bool,
) -> Result<(u64, u64), String> {
    let error = match lease.filter(|_| fault) {
        None => ErrorChain(&error).to_string(),
        Some(lease) => match lease.failed(error) {
            Ok(ejected) => ErrorChain(&ejected).to_string(),
            Err(error) => ErrorChain(&error).to_string(),
        },
    };
    Err(refuse_with(respond, error))
}

fn refuse_with(mut respond: SendResponse<Bytes>, error: String) -> String {
    reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
    error
}
