//! From the objects users write to the engine's policies, checking every value on the way.
//!
//! A policy that does not compile is replaced by one that is never more open than it: an
//! AuthorizationPolicy by a DENY of everything for its scope, a PeerAuthentication by STRICT.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::engine::{
    Action, AuthorizationPolicy, Cidr, Condition, Field, MtlsMode, Operation, PeerAuthentication,
    PolicyName, Rule, Scope, Source, StringMatch,
};
use super::model;

/// The annotation that makes a policy dry-run.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What is wrong with a policy, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct CompileError {
    pub field: String,
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> CompileError {
    CompileError {
        field: field.into(),
        message: message.into(),
    }
}

fn name_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> PolicyName {
    PolicyName {
        namespace: metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: metadata.name.clone().unwrap_or_default(),
    }
}

fn scope(selector: Option<&model::WorkloadSelector>) -> Scope {
    match selector {
        Some(selector) if !selector.match_labels.is_empty() => {
            Scope::Selector(selector.match_labels.clone())
        }
        _ => Scope::Namespace,
    }
}

pub(crate) fn authorization_policy(
    policy: &model::AuthorizationPolicy,
) -> Result<AuthorizationPolicy, CompileError> {
    let spec = &policy.spec;
    let name = name_of(&policy.metadata);
    let targets: Vec<&model::PolicyTargetReference> = spec
        .target_ref
        .iter()
        .chain(spec.target_refs.iter().flatten())
        .collect();
    let scope = if targets.is_empty() {
        scope(spec.selector.as_ref())
    } else if spec.selector.is_some() {
        return Err(error(
            "spec.targetRefs",
            "cannot be combined with spec.selector",
        ));
    } else {
        target_scope(&name.namespace, &targets)?
    };
    let action = match spec.action.unwrap_or(model::Action::Allow) {
        model::Action::Allow => Action::Allow,
        model::Action::Deny => Action::Deny,
        model::Action::Audit => Action::Audit,
        model::Action::Custom => {
            return Err(error(
                "spec.action",
                "CUSTOM needs an external authorizer, which ambit does not call",
            ));
        }
    };
    if spec.provider.is_some() {
        return Err(error(
            "spec.provider",
            "only used with CUSTOM, which ambit does not support",
        ));
    }
    let rules = spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, rule)| compile_rule(&format!("spec.rules[{index}]"), rule))
        .collect::<Result<_, _>>()?;
    let dry_run = policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v == "true");
    Ok(AuthorizationPolicy {
        name,
        scope,
        action,
        dry_run,
        rules,
    })
}

/// What a policy's `targetRefs` name: Services of its namespace (enforced at their waypoint,
/// or at their endpoints without one), or waypoints of its namespace (`Gateway`s of
/// `gateway.networking.k8s.io`, enforced by the waypoints).
pub(crate) fn target_scope(
    namespace: &str,
    targets: &[&model::PolicyTargetReference],
) -> Result<Scope, CompileError> {
    let mut services = Vec::new();
    let mut gateways = Vec::new();
    for (index, target) in targets.iter().enumerate() {
        let at = format!("spec.targetRefs[{index}]");
        match (target.group.as_str(), target.kind.as_str()) {
            ("", "Service") => services.push(target.name.clone()),
            ("gateway.networking.k8s.io", "Gateway") => gateways.push(target.name.clone()),
            (group, kind) => {
                return Err(error(
                    format!("{at}.kind"),
                    format!(
                        "{kind:?} of group {group:?}: ambit enforces policies on core Services and on waypoints (Gateways of gateway.networking.k8s.io)"
                    ),
                ));
            }
        }
        if target
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != namespace)
        {
            return Err(error(
                format!("{at}.namespace"),
                "must be the policy's own namespace",
            ));
        }
    }
    match (services.is_empty(), gateways.is_empty()) {
        (false, true) => Ok(Scope::Services(services)),
        (true, false) => Ok(Scope::Gateways(gateways)),
        _ => Err(error(
            "spec.targetRefs",
            "targets both Services and Gateways: write one policy for each",
        )),
    }
}

/// The stand-in for a policy that failed to compile: denies everything in its scope.
pub(crate) fn deny_all(name: PolicyName, scope: Scope) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name,
        scope,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule::default()],
    }
}

fn compile_rule(at: &str, rule: &model::Rule) -> Result<Rule, CompileError> {
    let mut uses_l7 = false;
    let mut undecidable = false;
    let mut from = Vec::new();
    for (index, entry) in rule.from.iter().flatten().enumerate() {
        let source = &entry.source;
        // Request principals come from JWTs, which ambit does not validate.
        undecidable |=
            source.request_principals.is_some() || source.not_request_principals.is_some();
        from.push(compile_source(
            &format!("{at}.from[{index}].source"),
            source,
        )?);
    }
    let mut to = Vec::new();
    for (index, entry) in rule.to.iter().flatten().enumerate() {
        let operation = &entry.operation;
        uses_l7 |= [
            &operation.hosts,
            &operation.not_hosts,
            &operation.methods,
            &operation.not_methods,
            &operation.paths,
            &operation.not_paths,
        ]
        .iter()
        .any(|field| field.is_some());
        let at = format!("{at}.to[{index}].operation");
        to.push(Operation {
            ports: ports(&at, &operation.ports, &operation.not_ports)?,
            hosts: strings(&at, "hosts", &operation.hosts, &operation.not_hosts)?,
            methods: strings(&at, "methods", &operation.methods, &operation.not_methods)?,
            paths: strings(&at, "paths", &operation.paths, &operation.not_paths)?,
        });
    }
    let mut when = Vec::new();
    for (index, condition) in rule.when.iter().flatten().enumerate() {
        match compile_condition(&format!("{at}.when[{index}]"), condition)? {
            Decidable::L4(condition) => when.push(condition),
            Decidable::Http(condition) => {
                uses_l7 = true;
                when.push(condition);
            }
            Decidable::Nowhere => undecidable = true,
        }
    }
    Ok(Rule {
        from,
        to,
        when,
        uses_l7,
        undecidable,
    })
}

/// Where a condition can be decided.
enum Decidable {
    L4(Condition),
    /// At a waypoint, with the request.
    Http(Condition),
    /// Nowhere in ambit: JWT claims, SNI.
    Nowhere,
}

/// The L4 fields of a `from.source`; request principals are L7 and handled by the caller.
fn compile_source(at: &str, source: &model::Source) -> Result<Source, CompileError> {
    if source.service_accounts.is_some() || source.not_service_accounts.is_some() {
        return Err(error(
            format!("{at}.serviceAccounts"),
            "not supported; use principals",
        ));
    }
    Ok(Source {
        principals: strings(at, "principals", &source.principals, &source.not_principals)?,
        namespaces: strings(at, "namespaces", &source.namespaces, &source.not_namespaces)?,
        ip_blocks: cidrs(at, "ipBlocks", &source.ip_blocks, &source.not_ip_blocks)?,
        remote_ip_blocks: cidrs(
            at,
            "remoteIpBlocks",
            &source.remote_ip_blocks,
            &source.not_remote_ip_blocks,
        )?,
    })
}

/// A condition, and where it can be decided.
fn compile_condition(at: &str, condition: &model::Condition) -> Result<Decidable, CompileError> {
    let (values, not_values) = (&condition.values, &condition.not_values);
    if values.is_none() && not_values.is_none() {
        return Err(error(
            format!("{at}.values"),
            "a condition needs values or notValues",
        ));
    }
    let key = condition.key.as_str();
    let compiled = match key {
        "source.ip" => Condition::SourceIp(cidrs(at, "values", values, not_values)?),
        "remote.ip" => Condition::RemoteIp(cidrs(at, "values", values, not_values)?),
        "destination.ip" => Condition::DestinationIp(cidrs(at, "values", values, not_values)?),
        "destination.port" => Condition::DestinationPort(ports(at, values, not_values)?),
        "source.namespace" => {
            Condition::SourceNamespace(strings(at, "values", values, not_values)?)
        }
        "source.principal" => {
            Condition::SourcePrincipal(strings(at, "values", values, not_values)?)
        }
        _ if key.starts_with("request.headers[") && key.ends_with(']') => {
            let name = &key["request.headers[".len()..key.len() - 1];
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(error(
                    format!("{at}.key"),
                    format!("{name:?} is no header name"),
                ));
            }
            return Ok(Decidable::Http(Condition::RequestHeader {
                name: name.to_ascii_lowercase(),
                values: strings(at, "values", values, not_values)?,
            }));
        }
        _ if key.starts_with("request.") || key == "connection.sni" => {
            return Ok(Decidable::Nowhere);
        }
        _ => {
            return Err(error(
                format!("{at}.key"),
                format!("unknown condition key {key:?}"),
            ));
        }
    };
    Ok(Decidable::L4(compiled))
}

fn field<T>(
    at: &str,
    name: &str,
    values: &Option<Vec<String>>,
    not_values: &Option<Vec<String>>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Field<T>, CompileError> {
    let not_name = format!("not{}{}", name[..1].to_uppercase(), &name[1..]);
    let convert = |name: &str, list: &Option<Vec<String>>| {
        list.as_ref()
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, v)| parse(v).map_err(|m| error(format!("{at}.{name}[{i}]"), m)))
                    .collect::<Result<Vec<T>, _>>()
            })
            .transpose()
    };
    Ok(Field {
        values: convert(name, values)?,
        not_values: convert(&not_name, not_values)?,
    })
}

fn strings(
    at: &str,
    name: &str,
    values: &Option<Vec<String>>,
    not_values: &Option<Vec<String>>,
) -> Result<Field<StringMatch>, CompileError> {
    field(at, name, values, not_values, string_match)
}

fn cidrs(
    at: &str,
    name: &str,
    values: &Option<Vec<String>>,
    not_values: &Option<Vec<String>>,
) -> Result<Field<Cidr>, CompileError> {
    field(at, name, values, not_values, cidr)
}

fn ports(
    at: &str,
    values: &Option<Vec<String>>,
    not_values: &Option<Vec<String>>,
) -> Result<Field<u16>, CompileError> {
    field(at, "ports", values, not_values, |v| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{v:?} is not a port"))
    })
}

/// `*`, `prefix*`, `*suffix` or an exact value; a `*` anywhere else is an error.
fn string_match(value: &str) -> Result<StringMatch, String> {
    let invalid = || format!("{value:?}: `*` may only stand alone, at the start or at the end");
    match value {
        "" => Err("empty value".into()),
        "*" => Ok(StringMatch::Any),
        _ => {
            if let Some(prefix) = value.strip_suffix('*') {
                return (!prefix.contains('*'))
                    .then(|| StringMatch::Prefix(prefix.to_owned()))
                    .ok_or_else(invalid);
            }
            if let Some(suffix) = value.strip_prefix('*') {
                return (!suffix.contains('*'))
                    .then(|| StringMatch::Suffix(suffix.to_owned()))
                    .ok_or_else(invalid);
            }
            (!value.contains('*'))
                .then(|| StringMatch::Exact(value.to_owned()))
                .ok_or_else(invalid)
        }
    }
}

/// `ip` or `ip/prefix`.
pub(crate) fn cidr(value: &str) -> Result<Cidr, String> {
    let invalid = || format!("{value:?} is not an IP address or CIDR block");
    let (ip, prefix) = match value.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (value, None),
    };
    let network: IpAddr = ip.parse().map_err(|_| invalid())?;
    let max = if network.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(invalid)?,
        None => max,
    };
    Ok(Cidr { network, prefix })
}

pub(crate) fn peer_authentication(
    policy: &model::PeerAuthentication,
) -> Result<PeerAuthentication, CompileError> {
    let spec = &policy.spec;
    let mode = |mtls: &model::Mtls| match mtls.mode {
        None | Some(model::MtlsModeName::Unset) => MtlsMode::Unset,
        Some(model::MtlsModeName::Disable) => MtlsMode::Disable,
        Some(model::MtlsModeName::Permissive) => MtlsMode::Permissive,
        Some(model::MtlsModeName::Strict) => MtlsMode::Strict,
    };
    let scope = scope(spec.selector.as_ref());
    let mut ports = BTreeMap::new();
    if let Some(port_level) = &spec.port_level_mtls {
        if scope == Scope::Namespace {
            return Err(error(
                "spec.portLevelMtls",
                "needs a spec.selector: ports belong to workloads",
            ));
        }
        for (port, mtls) in port_level {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| error(format!("spec.portLevelMtls.{port}"), "not a port"))?;
            ports.insert(port, mode(mtls));
        }
    }
    Ok(PeerAuthentication {
        name: name_of(&policy.metadata),
        scope,
        mode: spec.mtls.as_ref().map_or(MtlsMode::Unset, mode),
        ports,
    })
}

/// The stand-in for a PeerAuthentication that failed to compile: STRICT for its scope.
pub(crate) fn strict(name: PolicyName, scope: Scope) -> PeerAuthentication {
    PeerAuthentication {
        name,
        scope,
        mode: MtlsMode::Strict,
        ports: BTreeMap::new(),
    }
}
