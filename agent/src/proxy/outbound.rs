//! Outbound (15001): connections the pod's apps open, redirected here by capture. Mesh
//! destinations are reached through HBONE; anything else directly, from the pod's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::Pod;
use crate::accept::serve_listener;
use crate::access::{AccessLog, Direction};
use crate::drain::DrainWatcher;
use crate::hbone::{Baggage, ConnectRequest, WorkloadKind};
use crate::sockets::SocketFactory;
use crate::state::{Upstream, Workload};

pub(super) async fn serve(pod: Pod, listener: TcpListener, drain: DrainWatcher) {
    let pod = Arc::new(pod);
    serve_listener(listener, drain, "outbound", move |tcp, peer| {
        proxy(pod.clone(), tcp, peer)
    })
    .await;
}

async fn proxy(pod: Arc<Pod>, mut tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let destination = match ambit_redirect::socket::original_destination(&tcp) {
        Ok(destination) => destination,
        Err(error) => {
            tracing::warn!(src.addr = %peer, %error, "no original destination; closing");
            return;
        }
    };
    let mut log = AccessLog::new(Direction::Outbound, peer, destination, started);
    log.src_identity = Some(pod.identity.clone());
    log.src_workload = Some(pod.workload.qualified_name());

    let upstream = pod.state.borrow().resolve(destination);
    match upstream {
        Upstream::Hbone {
            workload,
            hbone_addr,
            authority,
        } => {
            log.dst_workload = Some(workload.qualified_name());
            let expected = match workload.identity(&pod.trust_domain) {
                Ok(identity) => identity,
                Err(error) => return log.fail(&error),
            };
            log.dst_identity = Some(expected.clone());
            let request = ConnectRequest {
                source: pod.identity.clone(),
                source_addr: peer,
                hbone_addr,
                authority,
                expected_identities: vec![expected],
                baggage: Some(baggage(&pod.workload)),
            };
            // Boxed: the connect phase's state is large and would otherwise stay allocated in
            // every connection's task for as long as it is copying.
            match Box::pin(pod.client.connect(&request, pod.sockets.as_ref())).await {
                Ok(tunnel) => log.finish(tunnel.copy_bidirectional(&mut tcp).await),
                Err(error) => log.fail(&error),
            }
        }
        Upstream::Passthrough { addr } => {
            let connected = async {
                let socket = pod
                    .sockets
                    .connector(SocketAddr::new(peer.ip(), 0), false)
                    .await?;
                socket.connect(addr).await
            };
            match connected.await {
                Ok(mut upstream) => {
                    log.finish_plain(tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await)
                }
                Err(error) => log.fail(&error),
            }
        }
        Upstream::NoEndpoint { service, port } => {
            log.fail(&NoEndpoint { service, port });
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("service {service} has no ready endpoint for port {port}")]
struct NoEndpoint {
    service: String,
    port: u16,
}

/// What the destination learns about the source workload.
fn baggage(workload: &Workload) -> Baggage {
    let service = ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|label| workload.labels.get(*label))
        .cloned()
        .unwrap_or_else(|| workload.name.clone());
    Baggage {
        namespace: Some(workload.namespace.clone()),
        workload: Some((WorkloadKind::Pod, workload.name.clone())),
        service_name: Some(service),
        ..Baggage::default()
    }
}
