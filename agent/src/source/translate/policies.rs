//! AuthorizationPolicies and PeerAuthentications. One that does not parse or compile is reported
//! and replaced by a stand-in that is never more open (a DENY of everything in its scope, or
//! STRICT mTLS); the others keep working.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Describe, Sourced};
use crate::policy::compile::{self, CompileError};
use crate::policy::{AuthorizationPolicies, AuthorizationPolicy, PeerAuthentications, PolicyName};
use crate::policy::{Scope, model};

pub(super) struct Compiled {
    pub(super) authorization: AuthorizationPolicies,
    pub(super) peer_authentication: PeerAuthentications,
    pub(super) rejected: Vec<String>,
}

pub(super) fn compile(
    authorization_policies: &[Sourced<Value>],
    peer_authentications: &[Sourced<Value>],
    root_namespace: &str,
    admitting_waypoints: Vec<AuthorizationPolicy>,
) -> Compiled {
    let mut rejected = Vec::new();
    let mut authorization: Vec<_> = authorization_policies
        .iter()
        .map(|policy| {
            compile_one(
                policy,
                "AuthorizationPolicy",
                compile::authorization_policy,
                compile::deny_all,
                &mut rejected,
            )
        })
        .collect();
    authorization.extend(admitting_waypoints);
    let peer_authentication: Vec<_> = peer_authentications
        .iter()
        .map(|policy| {
            compile_one(
                policy,
                "PeerAuthentication",
                compile::peer_authentication,
                compile::strict,
                &mut rejected,
            )
        })
        .collect();
    Compiled {
        authorization: AuthorizationPolicies::new(root_namespace, authorization),
        peer_authentication: PeerAuthentications::new(root_namespace, peer_authentication),
        rejected,
    }
}

/// Compiles one policy, or stands in for it with `fail_closed` and says why in `rejected`.
fn compile_one<M: DeserializeOwned, P>(
    policy: &Sourced<Value>,
    kind: &str,
    compile: impl Fn(&M) -> Result<P, CompileError>,
    fail_closed: impl Fn(PolicyName, Scope) -> P,
    rejected: &mut Vec<String>,
) -> P {
    let value = &*policy.object;
    let metadata = |field: &str| value.get("metadata")?.get(field)?.as_str();
    let object = Describe {
        origin: policy.origin,
        kind,
        namespace: metadata("namespace"),
        name: metadata("name"),
    };
    let compiled = serde_path_to_error::deserialize::<_, M>(value)
        .map_err(|error| {
            let field = error.path().to_string();
            format!("field `{field}`: {}", error.into_inner())
        })
        .and_then(|model| compile(&model).map_err(|e| e.to_string()));
    compiled.unwrap_or_else(|error| {
        rejected.push(format!("{object}: {error}"));
        let name = name(value);
        let scope = stand_in_scope(value, &name.namespace);
        fail_closed(name, scope)
    })
}

/// The object's name, read leniently: it names the stand-in of a policy that does not parse.
fn name(value: &Value) -> PolicyName {
    let metadata = |field: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    PolicyName {
        namespace: metadata("namespace").unwrap_or_else(|| "default".into()),
        name: metadata("name").unwrap_or_default(),
    }
}

/// The scope of the policy a stand-in replaces, read leniently: its `targetRefs` when they name
/// Services or waypoints of its namespace (so that a broken policy on a waypoint's traffic is
/// enforced by the waypoint), else its `selector.matchLabels`; the whole namespace when neither
/// reads.
fn stand_in_scope(value: &Value, namespace: &str) -> Scope {
    let spec = value.get("spec");
    let field = |name: &str| spec.and_then(|s| s.get(name)).cloned();
    let targets: Option<Vec<model::PolicyTargetReference>> = field("targetRefs")
        .and_then(|refs| serde_json::from_value(refs).ok())
        .or_else(|| {
            let target = serde_json::from_value(field("targetRef")?).ok()?;
            Some(vec![target])
        });
    if let Some(targets) = targets.filter(|t| !t.is_empty()) {
        let targets: Vec<&model::PolicyTargetReference> = targets.iter().collect();
        return compile::target_scope(namespace, &targets).unwrap_or(Scope::Namespace);
    }
    let selector = field("selector")
        .and_then(|s| s.get("matchLabels").cloned())
        .and_then(|labels| serde_json::from_value::<BTreeMap<String, String>>(labels).ok());
    selector
        .filter(|s| !s.is_empty())
        .map_or(Scope::Namespace, Scope::Selector)
}
