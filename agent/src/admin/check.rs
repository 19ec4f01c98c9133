//! `check`: what the policies would decide for a connection from a pod, identity or IP to a
//! pod's port, and why: which policies apply, which match, and the verdict.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ambit_identity::{Identity, TrustDomain};

use super::views::{CheckView, ModeView, PeerView, PolicyMatch};
use super::{action_name, mode_name, query};
use crate::authorize::{self, DenyReason, InboundRequest, Verdict};
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
    query: &str,
) -> Result<CheckView, CheckError> {
    let from = query::value(query, "from").ok_or(CheckError::Missing("from"))?;
    let to = query::value(query, "to").ok_or(CheckError::Missing("to"))?;
    let (to, port) = parse_target(&to)?;
    let destination = match to.parse::<IpAddr>() {
        Ok(ip) => state
            .workload_by_ip(ip)
            .cloned()
            .ok_or(CheckError::UnknownIp(ip))?,
        Err(_) => pod(state, to)?,
    };
    let (source, source_identity) = source(state, trust_domain, &from)?;
    let source_ip = source
        .as_ref()
        .and_then(|w| w.ips.first().copied())
        .or_else(|| from.parse().ok());
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
        policies: Vec::new(),
        allowed: true,
        decided_by: None,
        reason: String::new(),
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
    let (verdict, _) = authorize::evaluate(state, &destination, &request);
    (view.allowed, view.decided_by, view.reason) = match verdict {
        Verdict::Allow => match view
            .policies
            .iter()
            .find(|p| p.matched && p.action == "ALLOW" && !p.dry_run)
        {
            Some(allow) => (
                true,
                Some(allow.policy.clone()),
                format!("allowed by ALLOW policy {}", allow.policy),
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
            policy: Some(policy),
            reason: DenyReason::Authorization,
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
fn pod(state: &ClusterState, name: &str) -> Result<Arc<Workload>, CheckError> {
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
