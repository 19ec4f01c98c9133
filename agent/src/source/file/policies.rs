//! The file's AuthorizationPolicies and PeerAuthentications. One that does not parse or compile
//! is reported and replaced by a stand-in that is never more open (a DENY of everything in its
//! scope, or STRICT mTLS); the rest of the file keeps working.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::typed;
use crate::policy::compile::{self, CompileError};
use crate::policy::{
    AuthorizationPolicies, AuthorizationPolicy, PeerAuthentication, PeerAuthentications,
    PolicyName, model,
};

pub(super) struct Compiled {
    pub(super) authorization: AuthorizationPolicies,
    pub(super) peer_authentication: PeerAuthentications,
    pub(super) rejected: Vec<String>,
}

pub(super) fn compile(documents: Vec<(usize, String, Value)>, root_namespace: &str) -> Compiled {
    let mut authorization = Vec::new();
    let mut peer_authentication = Vec::new();
    let mut rejected = Vec::new();
    for (document, object, value) in documents {
        let (name, selector) = (name(&value), selector(&value));
        let compile_error = |e: CompileError| format!("document {document} ({object}): {e}");
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind == "AuthorizationPolicy" {
            let compiled: Result<AuthorizationPolicy, String> =
                typed::<model::AuthorizationPolicy>(document, &object, value)
                    .map_err(|e| e.to_string())
                    .and_then(|p| compile::authorization_policy(&p).map_err(compile_error));
            authorization.push(compiled.unwrap_or_else(|error| {
                rejected.push(error);
                compile::deny_all(name, selector)
            }));
        } else {
            let compiled: Result<PeerAuthentication, String> =
                typed::<model::PeerAuthentication>(document, &object, value)
                    .map_err(|e| e.to_string())
                    .and_then(|p| compile::peer_authentication(&p).map_err(compile_error));
            peer_authentication.push(compiled.unwrap_or_else(|error| {
                rejected.push(error);
                compile::strict(name, selector)
            }));
        }
    }
    Compiled {
        authorization: AuthorizationPolicies::new(root_namespace, authorization),
        peer_authentication: PeerAuthentications::new(root_namespace, peer_authentication),
        rejected,
    }
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
    serde_yaml_ng::from_value(labels.clone()).ok()
}
