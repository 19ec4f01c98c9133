//! Inbound plaintext (15006): TCP that reached the pod from outside the mesh, handed here by
//! capture with its original destination. The authorizer refuses it where PeerAuthentication is
//! STRICT, and otherwise decides without an identity. The app sees the real client address.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_redirect::AGENT_POD_PORTS;
use tokio::net::{TcpListener, TcpStream};

use super::Pod;
use crate::accept::serve_listener;
use crate::access::ConnectionRecord;
use crate::admission::Listener;
use crate::authorize::{Authorizer, InboundRequest, Verdict, WorkloadAuthorizer};
use crate::drain::DrainWatcher;
use crate::sockets;
use crate::telemetry::{Direction, Endpoints, Meter, Metered, Reporter, TrafficLabels};

pub(super) async fn serve_plaintext(
    pod: Pod,
    authorizer: Arc<WorkloadAuthorizer>,
    listener: TcpListener,
    drain: DrainWatcher,
) {
    let pod = Arc::new(pod);
    serve_listener(
        listener,
        drain,
        "inbound plaintext",
        move |tcp, peer, held| proxy(pod.clone(), authorizer.clone(), tcp, peer, held),
    )
    .await;
}

async fn proxy(
    pod: Arc<Pod>,
    authorizer: Arc<WorkloadAuthorizer>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    _held: DrainWatcher,
) {
    let _open = pod.telemetry.metrics.socket_opened(Reporter::Destination);
    let Some(pending) = pod.admission.admit(Listener::InboundPlaintext, &tcp, peer) else {
        return;
    };
    let destination = match tcp.local_addr() {
        Ok(destination) => destination,
        Err(error) => {
            tracing::warn!(src.addr = %peer, %error, "no destination address; closing");
            return;
        }
    };
    let request = InboundRequest {
        source_ip: peer.ip(),
        source_identity: None,
        destination,
    };
    let Some((workload, identity)) = pod.current() else {
        tracing::info!(src.addr = %peer, dst.addr = %destination, "the pod is leaving the mesh; closing");
        return;
    };
    let peers = authorizer.peers(&request);
    let labels = TrafficLabels::new(
        Reporter::Destination,
        &pod.telemetry.cluster,
        (peers.source.as_deref(), None),
        (Some(&workload), None),
        peers.service.as_deref(),
    );
    let endpoints = Endpoints {
        direction: Direction::InboundPlaintext,
        src: peer,
        dst: destination,
        src_identity: None,
        dst_identity: Some(identity),
        src_workload: peers.source.as_ref().map(|w| w.qualified_name()),
        dst_workload: Some(workload.qualified_name()),
        trace_id: None,
    };
    let record = ConnectionRecord::open(&pod.telemetry, endpoints, labels);
    if destination.ip() != pod.workload.ip || AGENT_POD_PORTS.contains(&destination.port()) {
        return record.fail(UnexpectedDestination(destination));
    }
    if let Verdict::Deny { policy, reason } = authorizer.authorize(&request) {
        return record.deny(policy.as_deref(), reason);
    }
    let revoked = authorizer.revoked(request);
    let client = SocketAddr::new(peer.ip(), 0);
    let mut app = match sockets::connect(pod.sockets.as_ref(), client, true, destination).await {
        Ok(app) => app,
        Err(error) => return record.fail(error),
    };
    drop(pending);
    let copy = async |meter: &Meter| {
        let mut client = Metered {
            inner: &mut tcp,
            meter,
        };
        tokio::io::copy_bidirectional(&mut client, &mut app).await
    };
    record.establish().carry_until_revoked(copy, revoked).await;
}

#[derive(Debug, thiserror::Error)]
#[error("{0} is not an app port of this pod")]
struct UnexpectedDestination(SocketAddr);
