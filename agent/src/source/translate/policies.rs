//! AuthorizationPolicies and PeerAuthentications. One that does not parse or compile is reported
//! and replaced by a stand-in that is never more open (a DENY of everything in its scope, or
//! STRICT mTLS); the others keep working.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Describe, Sourced};
use crate::policy::compile::{self, CompileError};
use crate::policy::{AuthorizationPolicies, AuthorizationPolicy, PeerAuthentications, PolicyName};

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
    fail_closed: impl Fn(PolicyName, Option<BTreeMap<String, String>>) -> P,
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
        fail_closed(name(value), selector(value))
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

/// The object's `spec.selector.matchLabels`, read leniently, so that a stand-in keeps the scope
/// of the policy it replaces. When unreadable, the stand-in covers the whole namespace.
fn selector(value: &Value) -> Option<BTreeMap<String, String>> {
    let labels = value.get("spec")?.get("selector")?.get("matchLabels")?;
    serde_json::from_value(labels.clone()).ok()
}
