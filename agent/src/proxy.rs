//! The agent's sockets inside one enrolled pod and the proxies behind them: outbound (15001),
//! inbound HBONE (15008), inbound plaintext (15006) and DNS (15053).

mod inbound;
mod outbound;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ambit_dns::DnsSockets;
use ambit_identity::{CertificateManager, Identity, TrustDomain};
use ambit_redirect::{
    CaptureTarget, DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PodNetns, socket,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::authorize::{WorkloadAuthorizer, WorkloadPolicy};
use crate::balance::Balancer;
use crate::dns::{NodeDns, PodNames, PodReplySockets};
use crate::drain::DrainWatcher;
use crate::egress::{self, OutboundTrafficPolicy};
use crate::hbone::{HboneClient, HboneServer, Keepalive};
use crate::revocation::Revocations;
use crate::sockets::PodSockets;
use crate::state::{ClusterState, LocalWorkload, Workload};
use crate::telemetry::Telemetry;

/// Why a pod's proxies could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the pod has no valid identity")]
    NoIdentity,
    #[error("failed to reach the pod's network namespace")]
    Netns(#[source] ambit_redirect::NetnsError),
    #[error("failed to listen on port {port} in the pod")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// What every proxy of one pod shares.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub(crate) workload: LocalWorkload,
    /// The pod's identity, updated when its service account changes; `None` while that makes no
    /// valid identity, when the pod's connections are refused.
    pub(crate) identity: watch::Receiver<Option<Identity>>,
    pub(crate) sockets: Arc<PodSockets>,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
    pub(crate) client: HboneClient,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) revocations: Arc<Revocations>,
    /// Chooses among a Service's endpoints; the node's, shared by its pods.
    pub(crate) balancer: Arc<Balancer>,
    /// The node's DNS proxy.
    pub(crate) dns: Arc<NodeDns>,
    /// What the pod was answered over DNS.
    pub(crate) names: Arc<PodNames>,
    /// `--outbound-traffic-policy`: the pod's, unless its namespace says otherwise.
    pub(crate) outbound_policy: OutboundTrafficPolicy,
}

impl Pod {
    /// The pod as the cluster describes it now, and its identity; `None` once it has left the
    /// cluster (it is being released) or while it has no valid identity: its connections are
    /// refused then.
    fn current(&self) -> Option<(Arc<Workload>, Identity)> {
        let identity = self.identity.borrow().clone()?;
        let workload = self.workload.current(&self.state.borrow())?.clone();
        Some((workload, identity))
    }

    /// Whether the pod may connect to `destination` outside the mesh.
    fn egress(
        &self,
        source: &Workload,
        destination: SocketAddr,
    ) -> Result<egress::Allowed, egress::EgressDenied> {
        let state = self.state.borrow();
        let resolved = &self.names.resolved;
        egress::decide_for(&state, self.outbound_policy, source, resolved, destination).1
    }
}

/// Opens the three listeners and the DNS proxy's sockets inside the pod: what capture steers
/// to, and what the proxies serve.
pub(crate) async fn listen(netns: &PodNetns, ip: IpAddr) -> Result<CaptureTarget, ProxyError> {
    // Transparent, as capture hands them connections addressed to other addresses.
    let listener = |port| async move {
        let addr: SocketAddr = socket::any(ip, port);
        netns
            .run(move || socket::listener(addr, true))
            .await
            .map_err(ProxyError::Netns)?
            .map(OwnedFd::from)
            .map_err(|source| ProxyError::Listen { port, source })
    };
    let outbound = listener(OUTBOUND_PORT).await?;
    let hbone = listener(HBONE_PORT).await?;
    let inbound_plaintext = listener(INBOUND_PLAINTEXT_PORT).await?;
    let (dns_udp, dns_tcp) = netns
        .run(|| socket::dns_sockets(DNS_PORT))
        .await
        .map_err(ProxyError::Netns)?
        .map_err(|source| ProxyError::Listen {
            port: DNS_PORT,
            source,
        })?;
    Ok(CaptureTarget {
        pod_ip: ip,
        outbound,
        inbound_plaintext,
        hbone,
        dns_udp: dns_udp.into(),
        dns_tcp: dns_tcp.into(),
    })
}

/// Runs the pod's proxies on duplicates of `listeners` (opened by [`listen`], or handed over by
/// the agent this one replaced) until `drain` fires.
pub(crate) async fn start(
    pod: Pod,
    listeners: &CaptureTarget,
    netns: &PodNetns,
    certificates: Arc<CertificateManager>,
    drain: DrainWatcher,
) -> Result<(), ProxyError> {
    // Non-blocking, as the runtime needs them, whoever made them (an agent of another version
    // may have handed them over): the flag belongs to the socket, shared by every duplicate.
    let duplicate = |socket: &OwnedFd| {
        let duplicate = socket.try_clone()?;
        socket2::SockRef::from(&duplicate).set_nonblocking(true)?;
        Ok(duplicate)
    };
    let duplicate = |socket: &OwnedFd, port| {
        duplicate(socket).map_err(|source| ProxyError::Listen { port, source })
    };
    let tcp = |socket: &OwnedFd, port| {
        TcpListener::from_std(std::net::TcpListener::from(duplicate(socket, port)?))
            .map_err(|source| ProxyError::Listen { port, source })
    };
    let outbound = tcp(&listeners.outbound, OUTBOUND_PORT)?;
    let hbone = tcp(&listeners.hbone, HBONE_PORT)?;
    let plaintext = tcp(&listeners.inbound_plaintext, INBOUND_PLAINTEXT_PORT)?;
    let dns_udp = std::net::UdpSocket::from(duplicate(&listeners.dns_udp, DNS_PORT)?);
    let dns_tcp = std::net::TcpListener::from(duplicate(&listeners.dns_tcp, DNS_PORT)?);
    let dns_sockets = DnsSockets {
        udp: dns_udp,
        tcp: dns_tcp,
        replies: Arc::new(PodReplySockets::new(netns.clone())),
    };
    tokio::spawn(pod.dns.clone().serve(
        pod.workload.clone(),
        pod.names.clone(),
        pod.state.clone(),
        dns_sockets,
        drain.clone(),
    ));

    let authorizer = Arc::new(WorkloadAuthorizer {
        policy: Arc::new(WorkloadPolicy {
            workload: pod.workload.clone(),
            telemetry: pod.telemetry.clone(),
        }),
        state: pod.state.clone(),
        revocations: pod.revocations.clone(),
    });
    let identity = pod
        .identity
        .borrow()
        .clone()
        .ok_or(ProxyError::NoIdentity)?;
    let server = HboneServer::new(
        identity,
        certificates,
        Keepalive::default(),
        pod.sockets.clone(),
        authorizer.clone(),
        pod.telemetry.clone(),
    )
    .following_identity(pod.identity.clone())
    .admission(pod.admission.clone());
    tokio::spawn(server.serve(hbone, drain.clone()));
    tokio::spawn(inbound::serve_plaintext(
        pod.clone(),
        authorizer,
        plaintext,
        drain.clone(),
    ));
    tokio::spawn(outbound::serve(pod, outbound, drain));
    Ok(())
}
