//! `check`: what the policies would decide for a connection from a pod, identity or IP to a
//! pod's port, and why: which policies apply, which match, and the verdict.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ambit_identity::{Identity, TrustDomain};

use super::views::{CheckView, EgressView, ModeView, PeerView, PolicyMatch};
use super::{EgressContext, action_name, mode_name, query};
use crate::authorize::{self, DenyReason, InboundRequest, Verdict};
use crate::egress::{self, Resolved};
use crate::state::{ClusterState, Protocol, Workload};

/// Why a check could not be run; the message is for the person who asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("missing the `{0}` parameter")]
    Missing(&'static str),
    #[error("{0:?} is not <pod|ip>:<port>")]
    Target(String),
    #[error("{0:?} is not a SPIFFE identity: {1}")]
    Identity(String, ambit_identity::IdentityError),
    #[error("no pod named {0:?}")]
    UnknownPod(String),
    #[error("{0:?} names several pods ({1}): give namespace/name")]
    Ambiguous(String, String),
    #[error("no workload has the IP {0}")]
    UnknownIp(IpAddr),
}

/// Splits `<pod|ip>:<port>`.
pub(crate) fn parse_target(target: &str) -> Result<(&str, u16), CheckError> {
    let malformed = || CheckError::Target(target.to_owned());
    let (name, port) = target.rsplit_once(':').ok_or_else(malformed)?;
    let port = port.parse().map_err(|_| malformed())?;
    if name.is_empty() {
        return Err(malformed());
    }
    Ok((name, port))
}

pub(crate) fn run(
    state: &ClusterState,
    trust_domain: &TrustDomain,
    egress: &EgressContext,
    query: &str,
) -> Result<CheckView, CheckError> {
    let from = query::value(query, "from").ok_or(CheckError::Missing("from"))?;
    let to = query::value(query, "to").ok_or(CheckError::Missing("to"))?;
    let (to, port) = parse_target(&to)?;
    let (source, source_identity) = source(state, trust_domain, &from)?;
    let source_ip = source
        .as_ref()
        .and_then(|w| w.ips.first().copied())
        .or_else(|| from.parse().ok());
    let destination = match to.parse::<IpAddr>() {
        Ok(ip) => match state.workload_by_ip(ip) {
            Some(workload) => workload.clone(),
            None => {
                let egress = egress_view(state, egress, source.as_deref(), (ip, port).into());
                return Ok(outside_the_mesh(
                    source_ip,
                    source_identity,
                    source,
                    ip,
                    port,
                    egress,
                ));
            }
        },
        Err(_) => pod(state, to)?,
    };
    let destination_ip = destination
        .ips
        .first()
        .copied()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut view = CheckView {
        source: PeerView {
            ip: source_ip,
            identity: source_identity.as_ref().map(ToString::to_string),
            workload: source.as_ref().map(|w| w.qualified_name()),
        },
        destination: PeerView {
            ip: Some(destination_ip),
            identity: destination
                .identity(trust_domain)
                .ok()
                .filter(|_| destination.protocol == Protocol::Hbone)
                .map(|id| id.to_string()),
            workload: Some(destination.qualified_name()),
        },
        port,
        transport: if source_identity.is_some() {
            "mutual_tls"
        } else {
            "plaintext"
        }
        .to_owned(),
        peer_authentication: None,
        waypoints: state
            .waypoints_of(destination_ip)
            .iter()
            .map(ToString::to_string)
            .collect(),
        policies: Vec::new(),
        allowed: true,
        decided_by: None,
        reason: String::new(),
        egress: None,
    };
    if destination.protocol != Protocol::Hbone {
        view.reason =
            "allowed: the destination is not in the mesh, so no policy is enforced".into();
        return Ok(view);
    }

    let request = InboundRequest {
        source_ip: source_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        source_identity,
        destination: SocketAddr::new(destination_ip, port),
    };
    if request.source_identity.is_none() {
        let (mode, policy) =
            state
                .peer_authentication()
                .decide(&destination.namespace, &destination.labels, port);
        view.peer_authentication = Some(ModeView {
            mode: mode_name(mode).to_owned(),
            policy: policy.map(ToString::to_string),
        });
    }
    let connection = authorize::connection(state, &destination, &request);
    view.policies = state
        .authorization()
        .explain(&connection)
        .into_iter()
        .map(|(policy, matched)| PolicyMatch {
            policy: policy.name.to_string(),
            action: action_name(policy.action).to_owned(),
            dry_run: policy.dry_run,
            matched,
        })
        .collect();
    let (verdict, decision) = authorize::evaluate(state, &destination, &request);
    (view.allowed, view.decided_by, view.reason) = match verdict {
        Verdict::Allow => match decision.and_then(|d| d.policy) {
            Some(policy) => (
                true,
                Some(policy.to_string()),
                format!("allowed by ALLOW policy {policy}"),
            ),
            None => (
                true,
                None,
                "allowed: no ALLOW policy applies and no DENY policy matches".to_owned(),
            ),
        },
        Verdict::Deny {
            policy,
            reason: DenyReason::MtlsRequired,
        } => {
            let reason = format!(
                "denied: plaintext, and PeerAuthentication {} makes port {port} STRICT",
                policy.as_deref().unwrap_or("?")
            );
            (false, policy, reason)
        }
        Verdict::Deny {
            policy: None,
            reason: DenyReason::AroundWaypoint,
        } => {
            let reason = format!(
                "denied: the destination is behind waypoint {}; a connection must come from it, \
                 or be admitted by an ALLOW policy of the destination's",
                view.waypoints.join(", ")
            );
            (false, None, reason)
        }
        Verdict::Deny {
            policy: Some(policy),
            reason:
                DenyReason::Authorization | DenyReason::UnknownDestination | DenyReason::AroundWaypoint,
        } => {
            let reason = format!("denied by DENY policy {policy}");
            (false, Some(policy), reason)
        }
        Verdict::Deny { policy: None, .. } => (
            false,
            None,
            "denied: ALLOW policies apply and none matches".to_owned(),
        ),
    };
    Ok(view)
}

/// A check of an address that is no workload: only egress control decides.
fn outside_the_mesh(
    source_ip: Option<IpAddr>,
    source_identity: Option<Identity>,
    source: Option<Arc<Workload>>,
    ip: IpAddr,
    port: u16,
    egress: Option<EgressView>,
) -> CheckView {
    let (allowed, reason) = match &egress {
        Some(egress) => (
            egress.allowed,
            format!("{}: {}", verdict(egress.allowed), egress.reason),
        ),
        None => (
            true,
            "allowed: the destination is not in the mesh, and the source is no pod of the cluster"
                .to_owned(),
        ),
    };
    CheckView {
        source: PeerView {
            ip: source_ip,
            identity: source_identity.map(|id| id.to_string()),
            workload: source.as_ref().map(|w| w.qualified_name()),
        },
        destination: PeerView {
            ip: Some(ip),
            identity: None,
            workload: None,
        },
        port,
        transport: "plaintext".to_owned(),
        peer_authentication: None,
        waypoints: Vec::new(),
        policies: Vec::new(),
        allowed,
        decided_by: None,
        reason,
        egress,
    }
}

/// Whether `source`'s outbound traffic policy lets it reach `destination`; `None` when the
/// source is no pod.
fn egress_view(
    state: &ClusterState,
    context: &EgressContext,
    source: Option<&Workload>,
    destination: SocketAddr,
) -> Option<EgressView> {
    let source = source?;
    let names = context.dns.pod_names(&source.uid);
    let nothing_resolved = Resolved::default();
    let resolved = names.as_ref().map_or(&nothing_resolved, |n| &n.resolved);
    let (policy, decision) =
        egress::decide_for(state, context.default, source, resolved, destination);
    Some(EgressView {
        policy: policy.as_str().to_owned(),
        allowed: decision.is_ok(),
        reason: match decision {
            Ok(allowed) => allowed.to_string(),
            Err(denied) => denied.to_string(),
        },
    })
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// The source: a SPIFFE identity, an IP, or a pod; a source in the mesh proves its identity.
fn source(
    state: &ClusterState,
    trust_domain: &TrustDomain,
    from: &str,
) -> Result<(Option<Arc<Workload>>, Option<Identity>), CheckError> {
    if from.starts_with("spiffe://") {
        let identity: Identity = from
            .parse()
            .map_err(|error| CheckError::Identity(from.to_owned(), error))?;
        let workload = state
            .workloads()
            .into_iter()
            .find(|w| {
                w.identity(identity.trust_domain())
                    .is_ok_and(|id| id == identity)
            })
            .cloned();
        return Ok((workload, Some(identity)));
    }
    let workload = match from.parse::<IpAddr>() {
        Ok(ip) => state.workload_by_ip(ip).cloned(),
        Err(_) => Some(pod(state, from)?),
    };
    let identity = workload
        .as_ref()
        .filter(|w| w.protocol == Protocol::Hbone)
        .and_then(|w| w.identity(trust_domain).ok());
    Ok((workload, identity))
}

/// A pod by `namespace/name`, or by a name that only one namespace has.
pub(crate) fn pod(state: &ClusterState, name: &str) -> Result<Arc<Workload>, CheckError> {
    let matches: Vec<&Arc<Workload>> = state
        .workloads()
        .into_iter()
        .filter(|w| match name.split_once('/') {
            Some((namespace, pod)) => w.namespace == namespace && w.name == pod,
            None => w.name == name,
        })
        .collect();
    match matches.as_slice() {
        [] => Err(CheckError::UnknownPod(name.to_owned())),
        [pod] => Ok((*pod).clone()),
        several => {
            let names: Vec<String> = several.iter().map(|w| w.qualified_name()).collect();
            Err(CheckError::Ambiguous(name.to_owned(), names.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::NodeDns;
    use crate::egress::OutboundTrafficPolicy;
    use crate::source::file::parse;

    const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node2, serviceAccountName: db, containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: legacy}
spec: {nodeName: node2, containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.3}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}], to: [{operation: {ports: ['5432']}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

    fn check(from: &str, to: &str) -> Result<CheckView, CheckError> {
        let state = parse(CLUSTER, "istio-system").unwrap();
        check_with(&state, OutboundTrafficPolicy::AllowAny, from, to)
    }

    fn check_with(
        state: &ClusterState,
        default: OutboundTrafficPolicy,
        from: &str,
        to: &str,
    ) -> Result<CheckView, CheckError> {
        let query = query::encode(&[("from", from), ("to", to)]);
        let egress = EgressContext {
            default,
            dns: Arc::new(NodeDns::unused()),
        };
        run(state, &"cluster.local".parse().unwrap(), &egress, &query)
    }

    #[test]
    fn egress_is_explained_for_addresses_outside_the_mesh() {
        let state = parse(CLUSTER, "istio-system").unwrap();
        let anywhere = check_with(
            &state,
            OutboundTrafficPolicy::AllowAny,
            "shop/web",
            "192.0.2.1:443",
        )
        .unwrap();
        assert!(anywhere.allowed);
        let registry_only = check_with(
            &state,
            OutboundTrafficPolicy::RegistryOnly,
            "shop/web",
            "192.0.2.1:443",
        )
        .unwrap();
        assert!(!registry_only.allowed);
        assert_eq!(registry_only.egress.unwrap().policy, "REGISTRY_ONLY");
        assert!(
            registry_only
                .reason
                .contains("no ServiceEntry lists the address"),
            "{}",
            registry_only.reason
        );
    }

    #[test]
    fn a_matching_deny_policy_is_named() {
        let view = check("shop/web", "shop/db:5432").unwrap();
        assert!(!view.allowed);
        assert_eq!(view.decided_by.as_deref(), Some("shop/no-web"));
        assert_eq!(view.reason, "denied by DENY policy shop/no-web");
        assert!(view.policies[0].matched);

        let other_port = check("spiffe://cluster.local/ns/shop/sa/web", "10.0.0.2:80").unwrap();
        assert!(other_port.allowed);
        assert_eq!(
            other_port.reason,
            "allowed: no ALLOW policy applies and no DENY policy matches"
        );
    }

    #[test]
    fn plaintext_meets_peer_authentication_first() {
        let view = check("legacy/db", "web:8080").unwrap();
        assert_eq!(view.transport, "plaintext");
        let mode = view.peer_authentication.unwrap();
        assert_eq!(
            (mode.mode.as_str(), mode.policy.as_deref()),
            ("STRICT", Some("shop/strict"))
        );
        assert_eq!(
            view.reason,
            "denied: plaintext, and PeerAuthentication shop/strict makes port 8080 STRICT"
        );
    }

    #[test]
    fn a_destination_outside_the_mesh_has_no_policy() {
        let view = check("web", "legacy/db:5432").unwrap();
        assert!(view.allowed && view.policies.is_empty());
    }

    #[test]
    fn names_must_lead_to_one_pod() {
        let error = |from, to| check(from, to).unwrap_err().to_string();
        assert_eq!(error("nobody", "web:80"), "no pod named \"nobody\"");
        assert_eq!(
            error("db", "web:80"),
            "\"db\" names several pods (legacy/db, shop/db): give namespace/name"
        );
        assert_eq!(error("web", "web"), "\"web\" is not <pod|ip>:<port>");
        assert_eq!(error("web", ":80"), "\":80\" is not <pod|ip>:<port>");
        assert!(
            error("spiffe://x/y", "web:80")
                .starts_with("\"spiffe://x/y\" is not a SPIFFE identity")
        );
    }
}
