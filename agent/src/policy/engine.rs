//! The compiled policies and their evaluation for one connection, with Istio's semantics at L4.
//! Evaluation borrows everything it compares and allocates nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ambit_identity::Identity;

use super::index::PrincipalIndex;
use crate::state::WaypointRef;

/// `namespace/name` of a policy object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every workload of the namespace (of the mesh, for the root namespace).
    Namespace,
    /// Workloads with these labels, in the namespace (anywhere, for the root namespace).
    Selector(BTreeMap<String, String>),
    /// Traffic to these Services of the namespace (`targetRefs`): at their waypoint when they
    /// have one, else at their endpoints.
    Services(Vec<String>),
    /// Traffic through these waypoints of the namespace (`targetRefs` of kind `Gateway`):
    /// enforced by the waypoints only.
    Gateways(Vec<String>),
    /// Workloads behind this waypoint: the agent's own policy that admits the waypoint (see
    /// `source::translate::waypoints`).
    Waypoint(WaypointRef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Logged and counted when it matches; never decides.
    Audit,
}

/// A string as AuthorizationPolicy matches it: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    /// Against a value already in lower case: host names.
    fn matches_ignoring_case(&self, lower: &str) -> bool {
        match self {
            Self::Exact(exact) => lower == exact.to_ascii_lowercase(),
            Self::Prefix(prefix) => lower.starts_with(&prefix.to_ascii_lowercase()),
            Self::Suffix(suffix) => lower.ends_with(&suffix.to_ascii_lowercase()),
            Self::Any => !lower.is_empty(),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Any => !value.is_empty(),
        }
    }
}

/// An address block, `ip/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A field and its negation: `None` means the field is not set and constrains nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    pub values: Option<Vec<T>>,
    pub not_values: Option<Vec<T>>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            values: None,
            not_values: None,
        }
    }
}

impl<T> Field<T> {
    /// Both halves hold: some value matches (if set), no negated value matches (if set).
    fn matches(&self, matches: impl Fn(&T) -> bool) -> bool {
        self.values.as_ref().is_none_or(|v| v.iter().any(&matches))
            && self
                .not_values
                .as_ref()
                .is_none_or(|v| !v.iter().any(&matches))
    }
}

/// `from.source`: all set fields must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Field<StringMatch>,
    pub namespaces: Field<StringMatch>,
    pub ip_blocks: Field<Cidr>,
    pub remote_ip_blocks: Field<Cidr>,
}

/// `to.operation`: its ports, and the HTTP fields a waypoint decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Field<u16>,
    /// Matched without regard to case, as host names are.
    pub hosts: Field<StringMatch>,
    pub methods: Field<StringMatch>,
    pub paths: Field<StringMatch>,
}

/// A `when` condition on an L4 attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    SourceIp(Field<Cidr>),
    RemoteIp(Field<Cidr>),
    SourceNamespace(Field<StringMatch>),
    SourcePrincipal(Field<StringMatch>),
    DestinationIp(Field<Cidr>),
    DestinationPort(Field<u16>),
    /// `request.headers[name]`, at a waypoint; `name` in lower case.
    RequestHeader {
        name: String,
        values: Field<StringMatch>,
    },
}

/// One rule: any `from`, any `to`, every `when`. A rule that cannot be decided where it is
/// evaluated never matches in an ALLOW policy and always matches in a DENY policy: one with HTTP
/// fields anywhere but at a waypoint, one with attributes ambit decides nowhere (request
/// principals, `request.auth.*`, `connection.sni`) everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// Has HTTP fields: decided at a waypoint, with the request.
    pub uses_l7: bool,
    /// Has attributes ambit decides nowhere.
    pub undecidable: bool,
}

/// An HTTP request, as a waypoint's authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// `:authority`, or `Host`.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub name: PolicyName,
    pub scope: Scope,
    pub action: Action,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

/// What a connection looks like to authorization.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub source_ip: IpAddr,
    /// `None` for plaintext: principals and namespaces cannot match.
    pub source_identity: Option<&'a Identity>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub destination_namespace: &'a str,
    pub destination_labels: &'a BTreeMap<String, String>,
    /// The Services (of its namespace) the destination is an endpoint of.
    pub destination_services: &'a [String],
    /// The waypoints in front of the destination.
    pub destination_waypoints: &'a [WaypointRef],
    /// At a waypoint, the HTTP request; `None` at L4.
    pub request: Option<&'a HttpRequest<'a>>,
}

impl Connection<'_> {
    /// The principal as Istio writes it: the SPIFFE ID without `spiffe://`.
    fn principal(&self) -> Option<&str> {
        self.source_identity
            .map(|id| id.as_str().trim_start_matches("spiffe://"))
    }

    fn source_namespace(&self) -> Option<&str> {
        self.source_identity.map(Identity::namespace)
    }
}

/// The outcome for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The policy that decided: the DENY that matched, or the ALLOW that matched. `None` when no
    /// ALLOW policy applies (allowed) or none of those that apply matched (denied).
    pub policy: Option<&'a PolicyName>,
    /// An AUDIT policy that matched.
    pub audit: Option<&'a PolicyName>,
    /// A dry-run policy that would have denied the connection.
    pub dry_run_deny: Option<&'a PolicyName>,
}

/// Every AuthorizationPolicy of the cluster, by namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizationPolicies {
    root_namespace: String,
    by_namespace: HashMap<String, NamespacePolicies>,
}

/// One namespace's policies, sorted by name, and their index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NamespacePolicies {
    policies: Vec<AuthorizationPolicy>,
    index: PrincipalIndex,
}

impl AuthorizationPolicies {
    pub fn new(
        root_namespace: &str,
        policies: impl IntoIterator<Item = AuthorizationPolicy>,
    ) -> Self {
        let mut by_namespace: HashMap<String, Vec<AuthorizationPolicy>> = HashMap::new();
        for policy in policies {
            by_namespace
                .entry(policy.name.namespace.clone())
                .or_default()
                .push(policy);
        }
        let by_namespace = by_namespace
            .into_iter()
            .map(|(namespace, mut policies)| {
                policies.sort_by(|a, b| a.name.cmp(&b.name));
                let index = PrincipalIndex::new(&policies);
                (namespace, NamespacePolicies { policies, index })
            })
            .collect();
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
        }
    }

    /// Decides `connection` at its destination: a matching DENY denies; else, with no ALLOW
    /// policy applying, allow; else allow only if an ALLOW policy matches. Only the policies
    /// that can match its source are evaluated, in the order of all of them: the decision, and
    /// the policy it names, are those of evaluating every policy that applies.
    pub fn decide<'a>(&'a self, connection: &Connection<'_>) -> Decision<'a> {
        let principal = connection.principal();
        let namespaces = self.namespaces(connection.destination_namespace);
        let allow_applies = namespaces
            .iter()
            .flatten()
            .any(|namespace| namespace.index.allow_applies(connection));
        let candidates = namespaces
            .into_iter()
            .flatten()
            .flat_map(|namespace| {
                namespace
                    .index
                    .candidates(principal)
                    .filter_map(|position| namespace.policies.get(position))
            })
            .filter(|policy| applies(&policy.scope, connection));
        decide_among(candidates, allow_applies, connection)
    }

    /// Decides a request at `waypoint` to `service` (`namespace`, `name`), when it addressed
    /// one: the policies that target the waypoint, or the Service; as istiod attaches them, a
    /// waypoint applies no selector or namespace-wide policy.
    pub fn decide_at_waypoint<'a>(
        &'a self,
        waypoint: &WaypointRef,
        service: Option<(&str, &str)>,
        connection: &Connection<'_>,
    ) -> Decision<'a> {
        decide_among(self.at_waypoint(waypoint, service), false, connection)
    }

    /// The policies a waypoint applies to a request to `service`.
    pub fn at_waypoint<'s>(
        &'s self,
        waypoint: &WaypointRef,
        service: Option<(&str, &str)>,
    ) -> impl Iterator<Item = &'s AuthorizationPolicy> {
        let in_namespace = |namespace: &str| {
            self.by_namespace
                .get(namespace)
                .into_iter()
                .flat_map(|n| &n.policies)
        };
        let name = waypoint.name.clone();
        let gateway = in_namespace(&waypoint.namespace)
            .filter(move |p| matches!(&p.scope, Scope::Gateways(names) if names.contains(&name)));
        let service_name = service.map(|(_, name)| name.to_owned());
        let services = service
            .into_iter()
            .flat_map(move |(namespace, _)| in_namespace(namespace))
            .filter(move |p| match (&p.scope, &service_name) {
                (Scope::Services(names), Some(name)) => names.contains(name),
                _ => false,
            });
        gateway.chain(services)
    }
}

/// One pass over `policies`: a matching DENY denies; else, with no ALLOW policy among them (and
/// none known to apply already, `allow_applies`), allow; else allow only if an ALLOW policy
/// matches.
pub(super) fn decide_among<'a>(
    policies: impl Iterator<Item = &'a AuthorizationPolicy>,
    mut allow_applies: bool,
    connection: &Connection<'_>,
) -> Decision<'a> {
    let mut allowed_by = None;
    let mut audit = None;
    let mut dry_run_deny = None;
    let mut dry_run_allow: Option<(&PolicyName, bool)> = None;
    for policy in policies {
        match (policy.action, policy.dry_run) {
            (Action::Deny, false) => {
                if policy.matches(connection) {
                    return Decision {
                        allowed: false,
                        policy: Some(&policy.name),
                        audit,
                        dry_run_deny,
                    };
                }
            }
            (Action::Deny, true) => {
                if dry_run_deny.is_none() && policy.matches(connection) {
                    dry_run_deny = Some(&policy.name);
                }
            }
            (Action::Audit, _) => {
                if audit.is_none() && policy.matches(connection) {
                    audit = Some(&policy.name);
                }
            }
            (Action::Allow, false) => {
                allow_applies = true;
                if allowed_by.is_none() && policy.matches(connection) {
                    allowed_by = Some(&policy.name);
                }
            }
            (Action::Allow, true) => {
                let (_, matched) = dry_run_allow.get_or_insert((&policy.name, false));
                if !*matched {
                    *matched = policy.matches(connection);
                }
            }
        }
    }
    let allowed = !allow_applies || allowed_by.is_some();
    if allowed && dry_run_deny.is_none() {
        // A dry-run ALLOW applies but none matched: enforcing it would deny.
        dry_run_deny = dry_run_allow.and_then(|(name, matched)| (!matched).then_some(name));
    }
    Decision {
        allowed,
        policy: allowed_by,
        audit,
        dry_run_deny,
    }
}

impl AuthorizationPolicies {
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Every policy that applies to `connection`'s destination, with whether it matches: why
    /// [`decide`](Self::decide) decided as it did.
    pub fn explain<'a>(
        &'a self,
        connection: &Connection<'_>,
    ) -> Vec<(&'a AuthorizationPolicy, bool)> {
        self.applicable(connection)
            .map(|policy| (policy, policy.matches(connection)))
            .collect()
    }

    /// Every policy, sorted by namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        let mut policies: Vec<_> = self
            .by_namespace
            .values()
            .flat_map(|n| &n.policies)
            .collect();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        policies.into_iter()
    }

    /// The policies of the root namespace and of the destination's namespace that select it.
    pub(super) fn applicable<'s>(
        &'s self,
        connection: &Connection<'_>,
    ) -> impl Iterator<Item = &'s AuthorizationPolicy> {
        self.namespaces(connection.destination_namespace)
            .into_iter()
            .flatten()
            .flat_map(|namespace| &namespace.policies)
            .filter(|policy| applies(&policy.scope, connection))
    }

    /// The policies of the namespaces that may apply to a destination in `namespace`: the root
    /// namespace, then its own.
    fn namespaces(&self, namespace: &str) -> [Option<&NamespacePolicies>; 2] {
        let local = (namespace != self.root_namespace)
            .then(|| self.by_namespace.get(namespace))
            .flatten();
        [self.by_namespace.get(&self.root_namespace), local]
    }
}

/// Whether a policy of `scope`, in the root namespace or the destination's, applies to
/// `connection`'s destination.
fn applies(scope: &Scope, connection: &Connection<'_>) -> bool {
    match scope {
        Scope::Namespace => true,
        Scope::Selector(labels) => labels
            .iter()
            .all(|(k, v)| connection.destination_labels.get(k) == Some(v)),
        Scope::Services(names) => names
            .iter()
            .any(|name| connection.destination_services.contains(name)),
        Scope::Waypoint(waypoint) => connection.destination_waypoints.contains(waypoint),
        Scope::Gateways(_) => false,
    }
}

impl AuthorizationPolicy {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(connection, self.action))
    }
}

impl Rule {
    fn matches(&self, connection: &Connection<'_>, action: Action) -> bool {
        if self.undecidable || (self.uses_l7 && connection.request.is_none()) {
            return action == Action::Deny;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(connection)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(connection)))
            && self.when.iter().all(|c| c.matches(connection))
    }
}

/// Principal and namespace fields need a source identity: without one, a positive field never
/// matches and a negated one always holds.
fn identity_field(field: &Field<StringMatch>, value: Option<&str>) -> bool {
    match value {
        Some(value) => field.matches(|m| m.matches(value)),
        None => field.values.is_none(),
    }
}

impl Source {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        identity_field(&self.principals, connection.principal())
            && identity_field(&self.namespaces, connection.source_namespace())
            && self.ip_blocks.matches(|c| c.contains(connection.source_ip))
            && self
                .remote_ip_blocks
                .matches(|c| c.contains(connection.source_ip))
    }
}

impl Operation {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        if !self.ports.matches(|p| *p == connection.destination_port) {
            return false;
        }
        // A rule with HTTP fields is evaluated only with a request.
        let Some(request) = connection.request else {
            return true;
        };
        let host = request.host.to_ascii_lowercase();
        self.hosts.matches(|m| m.matches_ignoring_case(&host))
            && self.methods.matches(|m| m.matches(request.method))
            && self.paths.matches(|m| m.matches(request.path))
    }
}

impl Condition {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        match self {
            Self::SourceIp(field) | Self::RemoteIp(field) => {
                field.matches(|c| c.contains(connection.source_ip))
            }
            Self::DestinationIp(field) => field.matches(|c| c.contains(connection.destination_ip)),
            Self::DestinationPort(field) => field.matches(|p| *p == connection.destination_port),
            Self::SourceNamespace(field) => identity_field(field, connection.source_namespace()),
            Self::SourcePrincipal(field) => identity_field(field, connection.principal()),
            Self::RequestHeader { name, values } => {
                // Repeated headers count as one, joined with commas, as Envoy reads them; bytes
                // no string holds still count, so that a prefix rule cannot be dodged with them.
                let joined = connection.request.and_then(|r| {
                    let all: Vec<&[u8]> = r
                        .headers
                        .get_all(name.as_str())
                        .iter()
                        .map(http::HeaderValue::as_bytes)
                        .collect();
                    (!all.is_empty())
                        .then(|| String::from_utf8_lossy(&all.join(&b","[..])).into_owned())
                });
                // An absent header matches no value; negated values alone hold.
                match joined {
                    Some(value) => values.matches(|m| m.matches(&value)),
                    None => values.values.is_none(),
                }
            }
        }
    }
}

/// PeerAuthentication's mTLS modes; `Unset` inherits from the wider scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub name: PolicyName,
    pub scope: Scope,
    pub mode: MtlsMode,
    /// Per-port modes; Istio honours them only on workload-scoped policies.
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// Every PeerAuthentication of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAuthentications {
    root_namespace: String,
    policies: Vec<PeerAuthentication>,
}

impl PeerAuthentications {
    pub fn new(root_namespace: &str, mut policies: Vec<PeerAuthentication>) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            root_namespace: root_namespace.to_owned(),
            policies,
        }
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Every policy, sorted by namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.policies.iter()
    }

    /// The mTLS mode of `port` of a workload in `namespace` with `labels`, with the policy that
    /// set it: the most specific mode that is set wins (workload port, workload, namespace,
    /// mesh); the default is PERMISSIVE (no policy).
    pub fn decide(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> (MtlsMode, Option<&PolicyName>) {
        let selects = |p: &&PeerAuthentication| match &p.scope {
            Scope::Selector(selector) => {
                p.name.namespace == namespace
                    && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            }
            Scope::Namespace | Scope::Services(_) | Scope::Gateways(_) | Scope::Waypoint(_) => {
                false
            }
        };
        let namespace_wide = |ns: &str| {
            self.policies
                .iter()
                .find(|p| p.scope == Scope::Namespace && p.name.namespace == ns)
                .map(|p| (p.mode, &p.name))
        };
        let workload = self.policies.iter().find(selects);
        let candidates = [
            workload.and_then(|p| p.ports.get(&port).map(|mode| (*mode, &p.name))),
            workload.map(|p| (p.mode, &p.name)),
            namespace_wide(namespace),
            namespace_wide(&self.root_namespace),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|(mode, _)| *mode != MtlsMode::Unset)
            .map_or((MtlsMode::Permissive, None), |(mode, name)| {
                (mode, Some(name))
            })
    }
}
