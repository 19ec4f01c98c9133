//! Authorization of inbound connections: the seam between the proxies and the policy engine.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ambit_identity::Identity;
use tokio::sync::watch;

use crate::policy::{Connection, Decision, MtlsMode};
use crate::state::{ClusterState, Workload};

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
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorization => "denied by authorization policy",
            Self::MtlsRequired => "plaintext refused: PeerAuthentication is STRICT",
        }
    }
}

/// The future [`Authorizer::revoked`] returns.
pub type RevokedFuture = Pin<Box<dyn Future<Output = Verdict> + Send>>;

/// Decides who may connect to a workload, and notices when a policy change takes that back.
pub trait Authorizer: Send + Sync + fmt::Debug + 'static {
    fn authorize(&self, request: &InboundRequest) -> Verdict;

    /// Resolves, with the denial, once the policies no longer allow `request`.
    fn revoked(&self, request: InboundRequest) -> RevokedFuture;
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
}

/// The policies of the cluster, applied to one workload.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadAuthorizer {
    pub(crate) workload: Arc<Workload>,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
}

impl WorkloadAuthorizer {
    /// PeerAuthentication first (plaintext only), then AuthorizationPolicy.
    fn decide(&self, state: &ClusterState, request: &InboundRequest) -> Verdict {
        if request.source_identity.is_none() {
            let (mode, policy) = state.peer_authentication().decide(
                &self.workload.namespace,
                &self.workload.labels,
                request.destination.port(),
            );
            if mode == MtlsMode::Strict {
                return Verdict::Deny {
                    policy: policy.map(ToString::to_string),
                    reason: DenyReason::MtlsRequired,
                };
            }
        }
        let connection = Connection {
            source_ip: request.source_ip,
            source_identity: request.source_identity.as_ref(),
            destination_ip: request.destination.ip(),
            destination_port: request.destination.port(),
            destination_namespace: &self.workload.namespace,
            destination_labels: &self.workload.labels,
            destination_services: state.services_of(request.destination.ip()),
        };
        let decision = state.authorization().decide(&connection);
        report(&decision, request);
        if decision.allowed {
            Verdict::Allow
        } else {
            Verdict::Deny {
                policy: decision.policy.map(ToString::to_string),
                reason: DenyReason::Authorization,
            }
        }
    }
}

impl Authorizer for WorkloadAuthorizer {
    fn authorize(&self, request: &InboundRequest) -> Verdict {
        self.decide(&self.state.borrow(), request)
    }

    fn revoked(&self, request: InboundRequest) -> RevokedFuture {
        let (authorizer, mut state) = (self.clone(), self.state.clone());
        Box::pin(async move {
            loop {
                if state.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let current = state.borrow_and_update().clone();
                if let denied @ Verdict::Deny { .. } = authorizer.decide(&current, &request) {
                    return denied;
                }
            }
        })
    }
}

/// Logs what AUDIT and dry-run policies saw.
fn report(decision: &Decision<'_>, request: &InboundRequest) {
    if let Some(policy) = decision.audit {
        tracing::info!(target: "audit", %policy, src.addr = %request.source_ip, dst.addr = %request.destination, "AUDIT policy matched");
    }
    if let Some(policy) = decision.dry_run_deny {
        tracing::info!(%policy, src.addr = %request.source_ip, dst.addr = %request.destination, "dry-run policy would deny");
    }
}
