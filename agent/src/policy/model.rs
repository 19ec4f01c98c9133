//! Istio's `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication, as written by
//! users: only the fields Istio defines, so that a misspelt field is an error, not a silently
//! wider policy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The object; only its spec is strict, as `apiVersion`, `kind` and `status` are the API server's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicy {
    #[serde(default)]
    pub(crate) metadata: ObjectMeta,
    #[serde(default)]
    pub(crate) spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicySpec {
    pub(crate) selector: Option<WorkloadSelector>,
    pub(crate) target_ref: Option<PolicyTargetReference>,
    pub(crate) target_refs: Option<Vec<PolicyTargetReference>>,
    pub(crate) action: Option<Action>,
    /// CUSTOM's external authorizer; not read, as CUSTOM is refused.
    pub(crate) provider: Option<IgnoredAny>,
    pub(crate) rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WorkloadSelector {
    #[serde(default)]
    pub(crate) match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PolicyTargetReference {
    #[serde(default)]
    pub(crate) group: String,
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Rule {
    pub(crate) from: Option<Vec<From>>,
    pub(crate) to: Option<Vec<To>>,
    pub(crate) when: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct From {
    #[serde(default)]
    pub(crate) source: Source,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Source {
    pub(crate) principals: Option<Vec<String>>,
    pub(crate) not_principals: Option<Vec<String>>,
    pub(crate) request_principals: Option<Vec<String>>,
    pub(crate) not_request_principals: Option<Vec<String>>,
    pub(crate) namespaces: Option<Vec<String>>,
    pub(crate) not_namespaces: Option<Vec<String>>,
    pub(crate) ip_blocks: Option<Vec<String>>,
    pub(crate) not_ip_blocks: Option<Vec<String>>,
    pub(crate) remote_ip_blocks: Option<Vec<String>>,
    pub(crate) not_remote_ip_blocks: Option<Vec<String>>,
    pub(crate) service_accounts: Option<Vec<String>>,
    pub(crate) not_service_accounts: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct To {
    #[serde(default)]
    pub(crate) operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Operation {
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) not_hosts: Option<Vec<String>>,
    pub(crate) ports: Option<Vec<String>>,
    pub(crate) not_ports: Option<Vec<String>>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) not_methods: Option<Vec<String>>,
    pub(crate) paths: Option<Vec<String>>,
    pub(crate) not_paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Condition {
    pub(crate) key: String,
    pub(crate) values: Option<Vec<String>>,
    pub(crate) not_values: Option<Vec<String>>,
}

/// The object; only its spec is strict, as `apiVersion`, `kind` and `status` are the API server's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerAuthentication {
    #[serde(default)]
    pub(crate) metadata: ObjectMeta,
    #[serde(default)]
    pub(crate) spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationSpec {
    pub(crate) selector: Option<WorkloadSelector>,
    pub(crate) mtls: Option<Mtls>,
    /// By port number; keys are strings in JSON, as the API server serves them.
    pub(crate) port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Mtls {
    pub(crate) mode: Option<MtlsModeName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum MtlsModeName {
    Unset,
    Disable,
    Permissive,
    Strict,
}
