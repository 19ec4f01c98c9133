//! Entry points for the fuzz targets in `fuzz/`, compiled only under `--cfg fuzzing` (cargo-fuzz
//! sets it). Thin wrappers over crate-private parsing, so that no module is made public for the
//! fuzzers' sake; not an API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};

pub use ambit_redirect::AGENT_POD_PORTS;

use crate::authorize::{self, InboundRequest, Verdict};
use crate::balance::Balancer;
use crate::hbone::{self, Baggage, TraceParent};
use crate::source::{SourceError, file};
use crate::state::{ClusterState, Upstream, Workload};

/// The CONNECT headers the server reads.
pub const BAGGAGE: &str = hbone::BAGGAGE;
pub const TRACEPARENT: &str = hbone::TRACEPARENT;

/// The server's check of a CONNECT that arrived on a connection to `local`: the destination, or
/// the status it answers with and why.
pub fn destination<B>(
    request: &Request<B>,
    local: IpAddr,
    agent_ports: &[u16],
) -> Result<SocketAddr, (StatusCode, String)> {
    hbone::destination(request, local, agent_ports).map_err(|e| (e.status(), e.to_string()))
}

/// The CONNECT the client sends.
pub fn connect_request(
    authority: SocketAddr,
    source: SocketAddr,
    service: Option<&str>,
    baggage: Option<&Baggage>,
    trace: &TraceParent,
) -> Request<()> {
    hbone::connect_request(authority, source, service, baggage, trace)
}

/// The cluster file's text, parsed and translated as the file source does.
pub fn cluster_file(text: &str, root_namespace: &str) -> Result<ClusterState, SourceError> {
    file::parse(text, root_namespace)
}

/// Where a connection from `source` to `destination` goes, as the outbound proxy routes it
/// (through waypoints, to a Service's endpoints); and where the waypoint sends it on.
pub fn route(
    state: &ClusterState,
    source: IpAddr,
    destination: SocketAddr,
) -> (Upstream, Upstream) {
    let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
    let (routed, _) = state.resolve(source, destination, &balancer);
    let (direct, _) = state.resolve_direct(destination, &balancer);
    (routed, direct)
}

/// PeerAuthentication then AuthorizationPolicy, as the inbound proxies apply them.
pub fn authorize(state: &ClusterState, workload: &Workload, request: &InboundRequest) -> Verdict {
    authorize::evaluate(state, workload, request).0
}
