//! Authorization of inbound connections: the seam between the proxies and the policy engine.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ambit_identity::Identity;
use tokio::sync::watch;

use crate::policy::{Connection, Decision, MtlsMode};
use crate::revocation::Revocations;
use crate::state::{ClusterState, LocalWorkload, Service, Workload};
use crate::telemetry::Telemetry;

/// An inbound connection, as authorization sees it.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    pub source_ip: IpAddr,
    /// `None` for plaintext.
    pub source_identity: Option<Identity>,
    pub destination: SocketAddr,
}

/// What authorization decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by the named policy (`namespace/name`); `None` when ALLOW policies apply and none
    /// matched.
    Deny {
        policy: Option<String>,
        reason: DenyReason,
    },
}

/// Why a connection was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// By AuthorizationPolicy.
    Authorization,
    /// Plaintext to a port that PeerAuthentication makes STRICT.
    MtlsRequired,
    /// The destination pod has left the cluster's state: nothing is known to allow.
    UnknownDestination,
    /// The destination is behind a waypoint, and neither the connection came from it nor does
    /// an ALLOW policy admit the client directly.
    AroundWaypoint,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorization => "denied by authorization policy",
            Self::MtlsRequired => "plaintext refused: PeerAuthentication is STRICT",
            Self::UnknownDestination => "the destination pod is no longer in the cluster",
            Self::AroundWaypoint => {
                "the destination is behind a waypoint and the connection did not come through it"
            }
        }
    }
}

/// The future [`Authorizer::revoked`] returns.
pub type RevokedFuture = Pin<Box<dyn Future<Output = Verdict> + Send>>;

/// The workloads at both ends of an inbound connection and the Service it is reported under,
/// as far as they are known: what telemetry labels the connection with.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    pub source: Option<Arc<Workload>>,
    pub destination: Option<Arc<Workload>>,
    pub service: Option<Arc<Service>>,
}

/// Decides who may connect to a workload, notices when a policy change takes that back, and
/// says who the peers are.
pub trait Authorizer: Send + Sync + fmt::Debug + 'static {
    fn authorize(&self, request: &InboundRequest) -> Verdict;

    /// Resolves, with the denial, once the policies no longer allow `request`.
    fn revoked(&self, request: InboundRequest) -> RevokedFuture;

    /// The workloads behind `request`. A source workload is named only when its identity is
    /// the one the connection proved (or, for plaintext, by its IP).
    fn peers(&self, request: &InboundRequest) -> Peers;
}

/// Allows everything: for HBONE outside any pod, such as tests and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &InboundRequest) -> Verdict {
        Verdict::Allow
    }

    fn revoked(&self, _: InboundRequest) -> RevokedFuture {
        Box::pin(std::future::pending())
    }

    fn peers(&self, _: &InboundRequest) -> Peers {
        Peers::default()
    }
}

/// `request` to `workload`, as the policy engine sees it.
pub(crate) fn connection<'a>(
    state: &'a ClusterState,
    workload: &'a Workload,
    request: &'a InboundRequest,
) -> Connection<'a> {
    Connection {
        source_ip: request.source_ip,
        source_identity: request.source_identity.as_ref(),
        destination_ip: request.destination.ip(),
        destination_port: request.destination.port(),
        destination_namespace: &workload.namespace,
        destination_labels: &workload.labels,
        destination_services: state.services_of(request.destination.ip()),
        destination_waypoints: state.waypoints_of(request.destination.ip()),
        request: None,
    }
}

/// The policies of the cluster, applied to one workload as the cluster describes it at each
/// decision.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadAuthorizer {
    /// Shared with the connections it watches for revocation.
    pub(crate) policy: Arc<WorkloadPolicy>,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
    /// Where allowed connections wait to be revoked by a policy change.
    pub(crate) revocations: Arc<Revocations>,
}

/// The decisions on connections to one workload, against a given state.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadPolicy {
    pub(crate) workload: LocalWorkload,
    pub(crate) telemetry: Arc<Telemetry>,
}

impl WorkloadPolicy {
    /// Decides `request` against `state`. A decision that is `recorded` is counted, and logged
    /// when an AUDIT or dry-run policy matched; re-checks after a policy change are not.
    pub(crate) fn decide(
        &self,
        state: &ClusterState,
        request: &InboundRequest,
        recorded: bool,
    ) -> Verdict {
        let Some(workload) = self.workload.current(state) else {
            return Verdict::Deny {
                policy: None,
                reason: DenyReason::UnknownDestination,
            };
        };
        let (verdict, decision) = evaluate(state, workload, request);
        if recorded && let Some(decision) = decision {
            self.report(&decision, request);
        }
        verdict
    }

    /// Logs and counts what AUDIT and dry-run policies saw.
    fn report(&self, decision: &Decision<'_>, request: &InboundRequest) {
        let metrics = &self.telemetry.metrics;
        if let Some(policy) = decision.audit {
            metrics.decided("audit");
            tracing::info!(target: "audit", %policy, src.addr = %request.source_ip, dst.addr = %request.destination, "AUDIT policy matched");
        }
        if let Some(policy) = decision.dry_run_deny {
            metrics.decided("dry_run_deny");
            tracing::info!(%policy, src.addr = %request.source_ip, dst.addr = %request.destination, "dry-run policy would deny");
        }
    }

    /// Counts an open connection closed because a policy change denies it.
    pub(crate) fn revoked(&self) {
        self.telemetry.metrics.decided("revoke");
    }
}

/// PeerAuthentication first (plaintext only), then AuthorizationPolicy: the verdict on
/// `request` to `workload`, with the AuthorizationPolicy decision when one was taken.
pub(crate) fn evaluate<'s>(
    state: &'s ClusterState,
    workload: &Workload,
    request: &InboundRequest,
) -> (Verdict, Option<Decision<'s>>) {
    if request.source_identity.is_none() {
        let port = request.destination.port();
        let (mode, policy) =
            state
                .peer_authentication()
                .decide(&workload.namespace, &workload.labels, port);
        if mode == MtlsMode::Strict {
            let verdict = Verdict::Deny {
                policy: policy.map(ToString::to_string),
                reason: DenyReason::MtlsRequired,
            };
            return (verdict, None);
        }
    }
    let connection = connection(state, workload, request);
    let decision = state.authorization().decide(&connection);
    let verdict = if decision.allowed {
        Verdict::Allow
    } else {
        // No DENY matched, and of the ALLOW policies none did, the waypoints' among them.
        let around_waypoint =
            decision.policy.is_none() && !connection.destination_waypoints.is_empty();
        Verdict::Deny {
            policy: decision.policy.map(ToString::to_string),
            reason: if around_waypoint {
                DenyReason::AroundWaypoint
            } else {
                DenyReason::Authorization
            },
        }
    };
    (verdict, Some(decision))
}

impl Authorizer for WorkloadAuthorizer {
    fn authorize(&self, request: &InboundRequest) -> Verdict {
        let verdict = self.policy.decide(&self.state.borrow(), request, true);
        self.policy.telemetry.metrics.decided(match verdict {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
        });
        verdict
    }

    fn revoked(&self, request: InboundRequest) -> RevokedFuture {
        self.revocations
            .watch(self.policy.clone(), request, &self.state)
    }

    fn peers(&self, request: &InboundRequest) -> Peers {
        let state = self.state.borrow();
        let source = state
            .workload_by_ip(request.source_ip)
            .filter(|source| match &request.source_identity {
                Some(proved) => source
                    .identity(proved.trust_domain())
                    .is_ok_and(|expected| expected == *proved),
                None => true,
            })
            .cloned();
        Peers {
            source,
            destination: self.policy.workload.current(&state).cloned(),
            service: state.destination_service(request.destination).cloned(),
        }
    }
}
