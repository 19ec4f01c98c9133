//! Inbound plaintext (15006): TCP that reached the pod from outside the mesh, handed here by
//! capture with its original destination. The authorizer refuses it where PeerAuthentication is
//! STRICT, and otherwise decides without an identity. The app sees the real client address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_redirect::AGENT_POD_PORTS;
use tokio::net::{TcpListener, TcpStream};

use super::Pod;
use crate::accept::serve_listener;
use crate::access::{AccessLog, Direction};
use crate::authorize::{Authorizer, InboundRequest, Verdict, WorkloadAuthorizer};
use crate::drain::DrainWatcher;
use crate::sockets::SocketFactory;

pub(super) async fn serve_plaintext(
    pod: Pod,
    authorizer: Arc<WorkloadAuthorizer>,
    listener: TcpListener,
    drain: DrainWatcher,
) {
    let pod = Arc::new(pod);
    serve_listener(listener, drain, "inbound plaintext", move |tcp, peer| {
        proxy(pod.clone(), authorizer.clone(), tcp, peer)
    })
    .await;
}

async fn proxy(
    pod: Arc<Pod>,
    authorizer: Arc<WorkloadAuthorizer>,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let destination = match tcp.local_addr() {
        Ok(destination) => destination,
        Err(error) => {
            tracing::warn!(src.addr = %peer, %error, "no destination address; closing");
            return;
        }
    };
    let mut log = AccessLog::new(Direction::InboundPlaintext, peer, destination, started);
    log.dst_identity = Some(pod.identity.clone());
    log.dst_workload = Some(pod.workload.qualified_name());
    if destination.ip() != pod.ip || AGENT_POD_PORTS.contains(&destination.port()) {
        return log.fail(&UnexpectedDestination(destination));
    }
    let request = InboundRequest {
        source_ip: peer.ip(),
        source_identity: None,
        destination,
    };
    if let Verdict::Deny { policy, reason } = authorizer.authorize(&request) {
        return log.deny(policy.as_deref(), reason);
    }
    let revoked = authorizer.revoked(request);
    let connected = async {
        let socket = pod
            .sockets
            .connector(SocketAddr::new(peer.ip(), 0), true)
            .await?;
        socket.connect(destination).await
    };
    let mut app = match connected.await {
        Ok(app) => app,
        Err(error) => return log.fail(&error),
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut tcp, &mut app) => log.finish_plain(copied),
        Verdict::Deny { policy, .. } = revoked => log.revoke(policy.as_deref()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0} is not an app port of this pod")]
struct UnexpectedDestination(SocketAddr);
