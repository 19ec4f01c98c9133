//! Whether the caller may have the identity it asks for: its own always; another only if the
//! caller is a trusted node agent, calling with the token of its own pod, and a pod with that
//! identity runs on the node of that pod (Istio's node authorizer, checked against the API
//! server at each request rather than an informer's cache).

use ambit_identity::Identity;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use tonic::Code;

use super::api::{ApiCallError, bounded};
use super::authenticate::{BoundPod, Caller};
use super::refusal::Refusal;
use super::service_account::ServiceAccount;

/// The annotation the kubelet puts on the mirror of a static pod: a pod the node itself
/// declares, which a compromised node could create in any namespace.
const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Decides which identities callers may have.
pub(crate) struct Authorizer {
    client: kube::Client,
    trusted_node_accounts: Vec<ServiceAccount>,
}

/// Why a caller was allowed the identity: the log line tells which rule applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    /// The caller's own identity.
    Own,
    /// A node agent acting for a pod on its node.
    OnNode(String),
}

/// Why the caller may not have the identity.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthorizeError {
    #[error("{caller} is not a trusted node account: it may have its own identity only")]
    NotANodeAccount { caller: ServiceAccount },
    #[error("the token of {caller} is not bound to a pod, so its node is unknown")]
    TokenNotBoundToPod { caller: ServiceAccount },
    #[error("the caller's pod {namespace}/{name} does not exist")]
    CallerPodNotFound { namespace: String, name: String },
    #[error(
        "the caller's pod {name} is not the one its token was issued to (uid {found:?}, token's {expected:?})"
    )]
    CallerPodUid {
        name: String,
        found: String,
        expected: String,
    },
    #[error("the caller's pod {name} runs as {found}, not as the caller {caller}")]
    CallerPodAccount {
        name: String,
        found: String,
        caller: ServiceAccount,
    },
    #[error("the caller's pod {0} is not on a node")]
    CallerPodUnscheduled(String),
    #[error("no pod of {identity} runs on node {node}")]
    NoPodOnNode { identity: Identity, node: String },
    #[error("failed to read the caller's pod")]
    ReadCallerPod(#[source] ApiCallError),
    #[error("failed to list the pods of node {node}")]
    ListNodePods {
        node: String,
        #[source]
        source: ApiCallError,
    },
}

impl From<AuthorizeError> for Refusal {
    fn from(error: AuthorizeError) -> Self {
        let (code, reason) = match &error {
            AuthorizeError::NotANodeAccount { .. } => {
                (Code::PermissionDenied, "not_a_node_account")
            }
            AuthorizeError::TokenNotBoundToPod { .. } => {
                (Code::PermissionDenied, "token_not_bound_to_pod")
            }
            AuthorizeError::CallerPodNotFound { .. } => {
                (Code::PermissionDenied, "caller_pod_not_found")
            }
            AuthorizeError::CallerPodUid { .. } | AuthorizeError::CallerPodAccount { .. } => {
                (Code::PermissionDenied, "caller_pod_mismatch")
            }
            AuthorizeError::CallerPodUnscheduled(_) => {
                (Code::PermissionDenied, "caller_pod_unscheduled")
            }
            AuthorizeError::NoPodOnNode { .. } => (Code::PermissionDenied, "no_pod_on_node"),
            AuthorizeError::ReadCallerPod(_) | AuthorizeError::ListNodePods { .. } => {
                (Code::Unavailable, "pod_lookup_failed")
            }
        };
        Self::new(code, reason, &error)
    }
}

impl Authorizer {
    pub(crate) fn new(client: kube::Client, trusted_node_accounts: Vec<ServiceAccount>) -> Self {
        Self {
            client,
            trusted_node_accounts,
        }
    }

    /// Allows `caller` to have `identity`, or says why not. The trust domain is checked
    /// already.
    pub(crate) async fn authorize(
        &self,
        caller: &Caller,
        identity: &Identity,
    ) -> Result<Grant, AuthorizeError> {
        let account = &caller.account;
        if identity.namespace() == account.namespace()
            && identity.service_account() == account.name()
        {
            return Ok(Grant::Own);
        }
        if !self.trusted_node_accounts.contains(account) {
            return Err(AuthorizeError::NotANodeAccount {
                caller: account.clone(),
            });
        }
        let bound = caller
            .pod
            .as_ref()
            .ok_or_else(|| AuthorizeError::TokenNotBoundToPod {
                caller: account.clone(),
            })?;
        let node = self.caller_node(account, bound).await?;
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = bounded(
            Api::<Pod>::namespaced(self.client.clone(), identity.namespace()).list(&on_node),
        )
        .await
        .map_err(|source| AuthorizeError::ListNodePods {
            node: node.clone(),
            source,
        })?;
        if !pods.items.iter().any(|pod| runs_as(pod, identity)) {
            return Err(AuthorizeError::NoPodOnNode {
                identity: identity.clone(),
                node,
            });
        }
        Ok(Grant::OnNode(node))
    }

    /// The node of the pod the caller's token is bound to.
    async fn caller_node(
        &self,
        account: &ServiceAccount,
        bound: &BoundPod,
    ) -> Result<String, AuthorizeError> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), account.namespace());
        let pod = match bounded(pods.get(&bound.name)).await {
            Ok(pod) => pod,
            Err(error) if error.is_not_found() => {
                return Err(AuthorizeError::CallerPodNotFound {
                    namespace: account.namespace().to_owned(),
                    name: bound.name.clone(),
                });
            }
            Err(error) => return Err(AuthorizeError::ReadCallerPod(error)),
        };
        caller_pod_node(&pod, account, bound)
    }
}

/// The node of `pod`, once it is checked to be the pod the caller's token was issued to: same
/// UID (not a pod of the same name made since), running as the caller.
fn caller_pod_node(
    pod: &Pod,
    caller: &ServiceAccount,
    bound: &BoundPod,
) -> Result<String, AuthorizeError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if uid != bound.uid {
        return Err(AuthorizeError::CallerPodUid {
            name: bound.name.clone(),
            found: uid.to_owned(),
            expected: bound.uid.clone(),
        });
    }
    let account = service_account(pod);
    if account != Some(caller.name()) {
        return Err(AuthorizeError::CallerPodAccount {
            name: bound.name.clone(),
            found: account.unwrap_or_default().to_owned(),
            caller: caller.clone(),
        });
    }
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.clone())
        .filter(|node| !node.is_empty())
        .ok_or_else(|| AuthorizeError::CallerPodUnscheduled(bound.name.clone()))
}

/// Whether `pod` runs, or will run, with `identity`: in its namespace, as its service account,
/// not finished, and not a mirror pod, which the node itself declares.
fn runs_as(pod: &Pod, identity: &Identity) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"));
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(MIRROR_POD_ANNOTATION));
    pod.metadata.namespace.as_deref() == Some(identity.namespace())
        && service_account(pod) == Some(identity.service_account())
        && !finished
        && !mirror
}

/// The service account a pod runs as, as stored. Admission fills in `default` for every pod
/// but a mirror pod, which runs as none: an empty name is no identity, as in Istio.
fn service_account(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.as_deref())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(namespace: &str, uid: &str, account: Option<&str>, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: account.map(Into::into),
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    fn node_agent() -> (ServiceAccount, BoundPod) {
        let bound = BoundPod {
            name: "ambit-node1".into(),
            uid: "u1".into(),
        };
        ("ambit-system/ambit".parse().unwrap(), bound)
    }

    #[test]
    fn the_callers_pod_gives_its_node() {
        let (caller, bound) = node_agent();
        let agent = pod("ambit-system", "u1", Some("ambit"), "node1", "Running");
        assert_eq!(caller_pod_node(&agent, &caller, &bound).unwrap(), "node1");
    }

    #[test]
    fn a_pod_that_is_not_the_tokens_gives_none() {
        let (caller, bound) = node_agent();
        let check = |pod: Pod| caller_pod_node(&pod, &caller, &bound).unwrap_err();
        assert!(matches!(
            check(pod("ambit-system", "u2", Some("ambit"), "node1", "Running")),
            AuthorizeError::CallerPodUid { .. }
        ));
        assert!(matches!(
            check(pod("ambit-system", "u1", None, "node1", "Running")),
            AuthorizeError::CallerPodAccount { .. }
        ));
        assert!(matches!(
            check(pod("ambit-system", "u1", Some("ambit"), "", "Pending")),
            AuthorizeError::CallerPodUnscheduled(_)
        ));
    }

    #[test]
    fn an_identity_runs_in_a_live_pod_of_its_account() {
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert!(runs_as(
            &pod("shop", "w", Some("web"), "node1", "Running"),
            &web
        ));
        assert!(runs_as(
            &pod("shop", "w", Some("web"), "node1", "Pending"),
            &web
        ));
        assert!(!runs_as(
            &pod("shop", "w", Some("web"), "node1", "Succeeded"),
            &web
        ));
        assert!(!runs_as(
            &pod("shop", "w", Some("web"), "node1", "Failed"),
            &web
        ));
        assert!(!runs_as(
            &pod("shop", "w", Some("db"), "node1", "Running"),
            &web
        ));
        assert!(!runs_as(
            &pod("other", "w", Some("web"), "node1", "Running"),
            &web
        ));

        // Only a mirror pod has no service account; neither it nor a mirror pod that names
        // one runs as anyone.
        let default: Identity = "spiffe://cluster.local/ns/shop/sa/default".parse().unwrap();
        assert!(!runs_as(
            &pod("shop", "w", None, "node1", "Running"),
            &default
        ));
        let mut mirror = pod("shop", "w", Some("web"), "node1", "Running");
        mirror.metadata.annotations = Some([(MIRROR_POD_ANNOTATION.into(), "x".into())].into());
        assert!(!runs_as(&mirror, &web));
    }
}
