//! Outbound (15001): connections the pod's apps open, redirected here by capture. Mesh
//! destinations are reached through HBONE; anything else directly, from the pod's address.

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use ambit_identity::{Identity, IdentityError};
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

use super::Pod;
use crate::accept::serve_listener;
use crate::access::{ConnectionRecord, Established};
use crate::admission::{Listener, Pending};
use crate::balance::Lease;
use crate::drain::DrainWatcher;
use crate::hbone::{
    self, Baggage, ConnectError, ConnectRequest, EarlyBytes, TraceParent, WorkloadKind,
};
use crate::sockets;
use crate::state::{Upstream, WaypointRef, Workload};
use crate::telemetry::{Direction, Endpoints, Metered, Reporter, TrafficLabels};

pub(super) async fn serve(pod: Pod, listener: TcpListener, drain: DrainWatcher) {
    let pod = Arc::new(pod);
    serve_listener(listener, drain, "outbound", move |tcp, peer, held| {
        proxy(pod.clone(), tcp, peer, held)
    })
    .await;
}

/// Carries one connection; `_held` keeps a drain waiting until it ends.
async fn proxy(pod: Arc<Pod>, mut tcp: TcpStream, peer: SocketAddr, _held: DrainWatcher) {
    let _open = pod.telemetry.metrics.socket_opened(Reporter::Source);
    let Some(pending) = pod.admission.admit(Listener::Outbound, &tcp, peer) else {
        return;
    };
    let destination = match ambit_redirect::socket::original_destination(&tcp) {
        Ok(destination) => destination,
        Err(error) => {
            tracing::warn!(src.addr = %peer, %error, "no original destination; closing");
            return;
        }
    };
    // Capture steers no loopback destination: this is the pod reaching the agent's listener
    // itself, and relaying it would connect to that listener again, and again.
    if destination.ip().is_loopback() {
        tracing::info!(src.addr = %peer, dst.addr = %destination, "connection to the agent's own listener; closing");
        return;
    }
    let Some((source, identity)) = pod.current() else {
        tracing::info!(src.addr = %peer, dst.addr = %destination, "the pod is leaving the mesh; closing");
        return;
    };
    let trace = TraceParent::random();
    let Route {
        upstream,
        lease,
        service,
        record,
        expected,
    } = route(&pod, &source, &identity, peer, destination, &trace);
    let expected = match expected {
        Ok(expected) => expected,
        Err(error) => return record.fail(error),
    };
    let attempt = Attempt {
        record,
        lease,
        pending,
    };
    match upstream {
        Upstream::Hbone {
            hbone_addr,
            authority,
            ..
        } => {
            // Boxed: the connection's task keeps a pointer, not the request, while it copies.
            let request = Box::new(ConnectRequest {
                source: identity,
                source_addr: peer,
                hbone_addr,
                authority,
                service,
                expected_identities: expected.into_iter().collect(),
                baggage: Some(baggage(&source)),
                trace,
            });
            tunnel(&pod, &mut tcp, request, attempt).await;
        }
        // Judged on where the pod connected: a Service's cluster IP is in the mesh, whichever
        // endpoint (inside or outside the cluster) carries it.
        Upstream::Passthrough { addr } => match pod.egress(&source, destination) {
            Ok(_) => passthrough(&pod, &mut tcp, peer, addr, attempt).await,
            Err(denied) => {
                tracing::info!(src.addr = %peer, dst.addr = %destination, workload.uid = %source.uid, reason = %denied, "egress refused");
                pod.telemetry.metrics.egress_denied(&source, &denied);
                attempt.record.fail_denied(denied);
            }
        },
        Upstream::NoEndpoint { service, port } => {
            attempt.record.fail(NoEndpoint { service, port });
        }
        Upstream::NoWaypoint { waypoint, reason } => {
            attempt.record.fail(NoWaypoint { waypoint, reason });
        }
    }
}

/// Where one connection goes, and its record.
struct Route {
    upstream: Upstream,
    /// The Service endpoint chosen, when the client addressed a Service.
    lease: Option<Lease>,
    /// The hostname of the Service the client addressed, if it did.
    service: Option<String>,
    record: ConnectionRecord,
    /// The identity the destination must prove; none outside the mesh.
    expected: Result<Option<Identity>, IdentityError>,
}

/// A connection being opened upstream.
struct Attempt {
    record: ConnectionRecord,
    lease: Option<Lease>,
    pending: Pending,
}

impl Attempt {
    /// The upstream carries the connection from now on; the endpoint lease is held until it
    /// ends.
    fn establish(self) -> (Established, Option<Lease>) {
        drop(self.pending);
        if let Some(lease) = &self.lease {
            lease.succeeded();
        }
        (self.record.establish(), self.lease)
    }

    /// The client went away before its tunnel opened: the connection ends as one that carried
    /// nothing, with no verdict on the endpoint.
    fn abandon(self, error: impl Error) {
        self.record.establish().finish(Err::<(), _>(error));
    }

    /// The upstream could not be reached; the endpoint chosen is ejected when that is its
    /// `fault`.
    fn fail(self, error: impl Error + 'static, fault: bool) {
        let Some(lease) = self.lease.filter(|_| fault) else {
            return self.record.fail(error);
        };
        match lease.failed(error) {
            Ok(ejected) => self.record.fail(ejected),
            Err(error) => self.record.fail(error),
        }
    }
}

/// Where a connection from `source` (at `peer`) to `destination` goes, its record labelled with
/// both ends and, for a tunnel, with its `trace`.
fn route(
    pod: &Pod,
    source: &Arc<Workload>,
    identity: &Identity,
    peer: SocketAddr,
    destination: SocketAddr,
    trace: &TraceParent,
) -> Route {
    let ((upstream, lease), workload, service, addressed) = {
        let state = pod.state.borrow();
        (
            state.resolve(peer.ip(), destination, &pod.balancer),
            state.workload_by_ip(destination.ip()).cloned(),
            state.destination_service(destination).cloned(),
            // `forwarded: host=` names a Service only when the client addressed it, as ztunnel's.
            state.addressed_service(destination).cloned(),
        )
    };
    // A tunnel proves both identities; anything else is plaintext, with no principal.
    let expected = match &upstream {
        Upstream::Hbone { workload, .. } => workload.identity(&pod.trust_domain).map(Some),
        Upstream::Passthrough { .. }
        | Upstream::NoEndpoint { .. }
        | Upstream::NoWaypoint { .. } => Ok(None),
    };
    let principals = match &expected {
        Ok(Some(expected)) => (Some(identity), Some(expected)),
        _ => (None, None),
    };
    // Through a service, the endpoint chosen is the destination workload.
    let workload = match &upstream {
        Upstream::Hbone { workload, .. } => Some(workload.clone()),
        _ => workload,
    };
    let labels = TrafficLabels::new(
        Reporter::Source,
        &pod.telemetry.cluster,
        (Some(source), principals.0),
        (workload.as_deref(), principals.1),
        service.as_deref(),
    );
    let endpoints = Endpoints {
        direction: Direction::Outbound,
        src: peer,
        dst: destination,
        src_identity: Some(identity.clone()),
        dst_identity: principals.1.cloned(),
        src_workload: Some(source.qualified_name()),
        dst_workload: workload.as_ref().map(|w| w.qualified_name()),
        trace_id: matches!(upstream, Upstream::Hbone { .. }).then_some(trace.trace_id),
    };
    let record = ConnectionRecord::open(&pod.telemetry, endpoints, labels);
    Route {
        service: addressed.map(|s| s.hostname.clone()),
        upstream,
        lease,
        record,
        expected,
    }
}

/// Through HBONE; the connection stops pending once the tunnel is open. The request is dropped
/// then: its headers' strings are not held for as long as the connection lasts.
async fn tunnel(pod: &Pod, tcp: &mut TcpStream, request: Box<ConnectRequest>, attempt: Attempt) {
    let mut client = ClientBeforeTunnel {
        tcp: &*tcp,
        opened: false,
    };
    // Boxed: the connect phase's state is large and would otherwise stay allocated in every
    // connection's task for as long as it is copying.
    let connected = Box::pin(
        pod.client
            .connect(&request, pod.sockets.as_ref(), &mut client),
    )
    .await;
    let through_waypoint = request.authority.ip() != request.hbone_addr.ip();
    drop(request);
    match connected {
        Ok(tunnel) => {
            client.opened();
            let (connection, _lease) = attempt.establish();
            let copied = tunnel.copy_bidirectional(tcp, connection.meter()).await;
            connection.finish(copied);
        }
        Err(error @ ConnectError::Client(_)) => attempt.abandon(error),
        // The endpoint answered: its policy refused, which is no reason to eject it.
        Err(error) if error.is_denied() => attempt.record.fail_denied(error),
        Err(error) => {
            let fault = error.is_server_fault(through_waypoint);
            attempt.fail(error, fault);
        }
    }
}

/// The client's connection until its tunnel opens. What the app has sent by then goes with the
/// request: where the client speaks first (HTTP, TLS), the server's app has it a round trip
/// between the nodes sooner.
///
/// If the attempt ends without a tunnel, whichever way (refused, unreachable, reset by the
/// server, a drain that stops it), the connection is reset: without the mesh the client's
/// connect would have failed, and a clean end of stream could pass for an empty answer.
struct ClientBeforeTunnel<'a> {
    tcp: &'a TcpStream,
    opened: bool,
}

impl EarlyBytes for ClientBeforeTunnel<'_> {
    fn take_early(&mut self) -> io::Result<Bytes> {
        hbone::read_early(self.tcp)
    }
}

impl ClientBeforeTunnel<'_> {
    fn opened(mut self) {
        self.opened = true;
    }
}

impl Drop for ClientBeforeTunnel<'_> {
    fn drop(&mut self) {
        if !self.opened {
            sockets::reset_on_close(self.tcp);
        }
    }
}

/// Directly to `addr`, outside the mesh, from the pod's address.
async fn passthrough(
    pod: &Pod,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    attempt: Attempt,
) {
    let local = SocketAddr::new(peer.ip(), 0);
    match sockets::connect(pod.sockets.as_ref(), local, false, addr).await {
        Ok(mut upstream) => {
            let (connection, _lease) = attempt.establish();
            let mut client = Metered {
                inner: tcp,
                meter: connection.meter(),
            };
            let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            connection.finish(copied);
        }
        Err(error) => {
            let fault = sockets::is_unreachable(&error);
            attempt.fail(error, fault);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("service {service} has no ready endpoint for port {port}")]
struct NoEndpoint {
    service: String,
    port: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("the destination's waypoint {waypoint} cannot be reached ({reason}); not going around it")]
struct NoWaypoint {
    waypoint: WaypointRef,
    reason: &'static str,
}

/// What the destination learns about the source workload.
fn baggage(workload: &Workload) -> Baggage {
    Baggage {
        namespace: Some(workload.namespace.clone()),
        workload: Some((WorkloadKind::Pod, workload.name.clone())),
        service_name: Some(workload.canonical_service().to_owned()),
        ..Baggage::default()
    }
}
