//! Egress control: Istio's ServiceEntry as the registry of what lies outside the cluster, and
//! the outbound traffic policy that decides whether a pod may reach anything else. Under
//! `REGISTRY_ONLY` a pod reaches the mesh, the addresses ServiceEntries list, and the addresses
//! its own DNS answers gave it for a ServiceEntry's host, for as long as those answers live, on
//! the ports the ServiceEntry lists. Pure: the DNS proxy records the answers, the outbound proxy
//! asks.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::policy::Cidr;
use crate::state::{ClusterState, Workload};

/// The namespace label that sets its pods' outbound traffic policy, over `--outbound-traffic-policy`.
pub const OUTBOUND_POLICY_LABEL: &str = "ambit.dev/outbound-traffic-policy";
/// However short an answer's TTL, its addresses stay allowed this long: clients connect after
/// they resolve and keep what they resolved a while (a JVM 30 s), and an answer with a TTL of 0
/// must still be usable.
const MIN_ANSWER_LIFETIME: Duration = Duration::from_secs(60);
/// (address, name) pairs remembered per pod; the addresses answered least recently are
/// forgotten first.
const MAX_RESOLVED_PER_POD: usize = 4096;
/// Names remembered per address; the earliest to expire are forgotten first.
const MAX_NAMES_PER_ADDRESS: usize = 8;

/// Where a pod's connections to destinations outside the mesh may go, as Istio's
/// `outboundTrafficPolicy.mode` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutboundTrafficPolicy {
    /// Anywhere.
    #[default]
    #[value(name = "ALLOW_ANY")]
    AllowAny,
    /// Only to the mesh and to what ServiceEntries list.
    #[value(name = "REGISTRY_ONLY")]
    RegistryOnly,
}

impl OutboundTrafficPolicy {
    /// As Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowAny => "ALLOW_ANY",
            Self::RegistryOnly => "REGISTRY_ONLY",
        }
    }

    /// The mode a label value names, as Istio spells it.
    pub fn named(value: &str) -> Option<Self> {
        [Self::AllowAny, Self::RegistryOnly]
            .into_iter()
            .find(|policy| policy.as_str() == value)
    }
}

/// How a ServiceEntry's hosts find their addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The addresses the client connects to: the entry's `addresses` blocks, or, without them,
    /// what the client's DNS answers gave it for the hosts.
    None,
    /// The entry's endpoints; the DNS proxy answers them for its hosts.
    Static,
    /// DNS (`DNS`, `DNS_ROUND_ROBIN`): what the client's DNS answers gave it for the hosts.
    Dns,
}

/// A ServiceEntry host: `api.example.com`, or `*.example.com` for any name under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix, with its leading dot: `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// `host` lowercased, without a trailing dot: a name, or `*.` and a name for every name
    /// under it, as Istio accepts them. `*` alone, or a `*` anywhere else, is refused: a
    /// ServiceEntry for every name would open all egress.
    pub fn parse(host: &str) -> Result<Self, String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(suffix) => (Self::Wildcard(format!(".{suffix}")), suffix),
            None => (Self::Exact(host.clone()), host.as_str()),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if valid {
            Ok(pattern)
        } else {
            Err(format!(
                "{host:?} is not a host name, or `*.` and a host name"
            ))
        }
    }

    /// Whether `name` (lowercase, no trailing dot) is this host.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(host) => host == name,
            Self::Wildcard(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(host) => f.write_str(host),
            Self::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Istio's `networking.istio.io/v1` ServiceEntry, as far as egress and DNS read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<HostPattern>,
    pub addresses: Vec<Cidr>,
    pub ports: Vec<u16>,
    pub resolution: Resolution,
    pub endpoints: Vec<IpAddr>,
    /// The namespaces that see it; `None` for all (`exportTo` unset or `*`).
    pub export_to: Option<Vec<String>>,
}

impl ServiceEntry {
    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn visible_to(&self, namespace: &str) -> bool {
        self.export_to
            .as_ref()
            .is_none_or(|namespaces| namespaces.iter().any(|n| n == namespace))
    }

    pub fn matches_host(&self, name: &str) -> bool {
        self.hosts.iter().any(|host| host.matches(name))
    }

    /// Whether the entry lists `ip` itself, whatever its clients resolved.
    fn lists_address(&self, ip: IpAddr) -> bool {
        match self.resolution {
            Resolution::Static => self.endpoints.contains(&ip),
            Resolution::None => self.addresses.iter().any(|block| block.contains(ip)),
            Resolution::Dns => false,
        }
    }

    /// Whether a client's own DNS answers for its hosts decide where it may connect.
    fn admits_resolved(&self) -> bool {
        match self.resolution {
            Resolution::Dns => true,
            Resolution::None => self.addresses.is_empty(),
            Resolution::Static => false,
        }
    }
}

/// The cluster's ServiceEntries.
#[derive(Debug, Clone, Default)]
pub struct ServiceEntries {
    entries: Vec<Arc<ServiceEntry>>,
}

impl ServiceEntries {
    pub fn new(mut entries: Vec<ServiceEntry>) -> Self {
        entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Self {
            entries: entries.into_iter().map(Arc::new).collect(),
        }
    }

    /// Every entry, by namespace and name.
    pub fn all(&self) -> &[Arc<ServiceEntry>] {
        &self.entries
    }

    /// The entries that `namespace` sees and that have `host` (lowercase, no trailing dot).
    pub fn for_host<'a>(
        &'a self,
        namespace: &'a str,
        host: &'a str,
    ) -> impl Iterator<Item = &'a Arc<ServiceEntry>> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.visible_to(namespace) && e.matches_host(host))
    }
}

/// The addresses one pod's DNS answers gave it for names that ServiceEntries list, until when.
/// Bounded: past `MAX_RESOLVED_PER_POD` pairs the addresses answered least recently are
/// forgotten, and a connection to a forgotten address is refused as if it had expired.
#[derive(Debug, Default)]
pub struct Resolved {
    inner: Mutex<ResolvedInner>,
}

#[derive(Debug, Default)]
struct ResolvedInner {
    by_address: HashMap<IpAddr, AddressAnswers>,
    /// Addresses in the order they were answered, each with the answer's number; an entry whose
    /// address was answered again since is stale and skipped.
    order: VecDeque<(IpAddr, u64)>,
    answers: u64,
    pairs: usize,
}

/// What one address was answered for.
#[derive(Debug, Default)]
struct AddressAnswers {
    /// Each name, and until when.
    names: Vec<(Arc<str>, Instant)>,
    /// The number of the latest answer that gave the address.
    last: u64,
}

impl Resolved {
    /// Remembers that `name` resolved to `addresses`, for `ttl` (at least
    /// `MIN_ANSWER_LIFETIME`).
    pub fn record(&self, name: &str, addresses: &[IpAddr], ttl: Duration, now: Instant) {
        let until = now + ttl.max(MIN_ANSWER_LIFETIME);
        let name: Arc<str> = name.into();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *inner;
        for ip in addresses {
            inner.answers += 1;
            let AddressAnswers { names, last } = inner.by_address.entry(*ip).or_default();
            let before = names.len();
            names.retain(|(known, expires)| *known != name && *expires > now);
            names.push((name.clone(), until));
            if names.len() > MAX_NAMES_PER_ADDRESS {
                names.sort_by_key(|(_, expires)| std::cmp::Reverse(*expires));
                names.truncate(MAX_NAMES_PER_ADDRESS);
            }
            inner.pairs = inner.pairs - before + names.len();
            *last = inner.answers;
            inner.order.push_back((*ip, inner.answers));
        }
        while inner.pairs > MAX_RESOLVED_PER_POD || inner.order.len() > 2 * MAX_RESOLVED_PER_POD {
            let Some((ip, answer)) = inner.order.pop_front() else {
                break;
            };
            let current = inner.by_address.get(&ip).is_some_and(|a| a.last == answer);
            if current && let Some(forgotten) = inner.by_address.remove(&ip) {
                inner.pairs -= forgotten.names.len();
            }
        }
    }

    /// The names `ip` was answered for, and whether each answer still lives.
    fn names_of(&self, ip: IpAddr, now: Instant) -> Vec<(Arc<str>, bool)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.by_address.get(&ip).map_or_else(Vec::new, |answers| {
            answers
                .names
                .iter()
                .map(|(name, until)| (name.clone(), *until > now))
                .collect()
        })
    }
}

/// Why a connection may leave the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// `ALLOW_ANY`.
    AnyDestination,
    /// A Service or a pod of the cluster.
    Mesh,
    /// The ServiceEntry lists the address and the port.
    Listed { entry: String },
    /// The pod resolved `host` to the address, and a ServiceEntry of that host lists the port.
    Resolved { entry: String, host: String },
}

impl std::fmt::Display for Allowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AnyDestination => f.write_str("the outbound traffic policy is ALLOW_ANY"),
            Self::Mesh => f.write_str("the destination is in the mesh's registry"),
            Self::Listed { entry } => write!(f, "ServiceEntry {entry} lists the address and port"),
            Self::Resolved { entry, host } => write!(
                f,
                "the pod resolved {host} to this address, and ServiceEntry {entry} lists the port"
            ),
        }
    }
}

/// Why `REGISTRY_ONLY` refuses a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressDenied {
    #[error(
        "egress to {destination} refused (REGISTRY_ONLY): no ServiceEntry lists the address, and the pod resolved no listed host to it"
    )]
    Unlisted { destination: SocketAddr },
    #[error(
        "egress to {destination} refused (REGISTRY_ONLY): ServiceEntry {entry} ({host}) does not list port {}",
        .destination.port()
    )]
    PortNotListed {
        destination: SocketAddr,
        entry: String,
        host: String,
    },
    #[error(
        "egress to {destination} refused (REGISTRY_ONLY): the pod's DNS answer for {host} has expired"
    )]
    Expired {
        destination: SocketAddr,
        host: String,
    },
}

impl EgressDenied {
    /// The `reason` label of `ambit_egress_denied_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unlisted { .. } => "unlisted_destination",
            Self::PortNotListed { .. } => "unlisted_port",
            Self::Expired { .. } => "expired_answer",
        }
    }

    /// The host the destination was known by, if any.
    pub fn host(&self) -> Option<&str> {
        match self {
            Self::Unlisted { .. } => None,
            Self::PortNotListed { host, .. } | Self::Expired { host, .. } => Some(host),
        }
    }
}

/// Whether `source` may connect to `destination` outside HBONE, under its namespace's outbound
/// traffic policy (else `default`); with that policy.
pub fn decide_for(
    state: &ClusterState,
    default: OutboundTrafficPolicy,
    source: &Workload,
    resolved: &Resolved,
    destination: SocketAddr,
) -> (OutboundTrafficPolicy, Result<Allowed, EgressDenied>) {
    let policy = state.outbound_policy(&source.namespace, default);
    let now = Instant::now();
    let decision = decide(state, policy, &source.namespace, resolved, destination, now);
    (policy, decision)
}

/// Whether a pod of `namespace` under `policy` may connect to `destination`, outside HBONE.
pub fn decide(
    state: &ClusterState,
    policy: OutboundTrafficPolicy,
    namespace: &str,
    resolved: &Resolved,
    destination: SocketAddr,
    now: Instant,
) -> Result<Allowed, EgressDenied> {
    if policy == OutboundTrafficPolicy::AllowAny {
        return Ok(Allowed::AnyDestination);
    }
    if state.addressed_service(destination).is_some()
        || state.workload_by_ip(destination.ip()).is_some()
    {
        return Ok(Allowed::Mesh);
    }
    let (ip, port) = (destination.ip(), destination.port());
    let entries = state.service_entries().all();
    let mut denied = EgressDenied::Unlisted { destination };
    for entry in entries
        .iter()
        .filter(|e| e.visible_to(namespace) && e.lists_address(ip))
    {
        if entry.ports.contains(&port) {
            return Ok(Allowed::Listed {
                entry: entry.qualified_name(),
            });
        }
        denied = EgressDenied::PortNotListed {
            destination,
            entry: entry.qualified_name(),
            host: entry
                .hosts
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
        };
    }
    for (host, live) in resolved.names_of(ip, now) {
        for entry in state
            .service_entries()
            .for_host(namespace, &host)
            .filter(|e| e.admits_resolved())
        {
            let host = host.to_string();
            if !live {
                denied = EgressDenied::Expired { destination, host };
            } else if entry.ports.contains(&port) {
                return Ok(Allowed::Resolved {
                    entry: entry.qualified_name(),
                    host,
                });
            } else if !matches!(denied, EgressDenied::Expired { .. }) {
                denied = EgressDenied::PortNotListed {
                    destination,
                    entry: entry.qualified_name(),
                    host,
                };
            }
        }
    }
    Err(denied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse;

    const ENTRIES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.payments.example, "*.cdn.example"]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.corp.internal]
  ports: [{number: 5432, name: pg}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: office, namespace: billing}
spec:
  hosts: [office.corp.internal]
  addresses: [198.51.100.0/24]
  ports: [{number: 22, name: ssh}]
  exportTo: ["."]
"#;

    fn decide_for(
        namespace: &str,
        resolved: &Resolved,
        destination: &str,
        now: Instant,
    ) -> Result<Allowed, EgressDenied> {
        let state = parse(ENTRIES, "istio-system").unwrap();
        let destination = destination.parse().unwrap();
        let policy = OutboundTrafficPolicy::RegistryOnly;
        decide(&state, policy, namespace, resolved, destination, now)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn allow_any_allows_anything() {
        let state = parse(ENTRIES, "istio-system").unwrap();
        let allowed = decide(
            &state,
            OutboundTrafficPolicy::AllowAny,
            "shop",
            &Resolved::default(),
            "203.0.113.1:443".parse().unwrap(),
            Instant::now(),
        );
        assert_eq!(allowed, Ok(Allowed::AnyDestination));
    }

    #[test]
    fn the_mesh_and_listed_addresses_are_reached_on_listed_ports() {
        let (nothing, now) = (Resolved::default(), Instant::now());
        assert_eq!(
            decide_for("shop", &nothing, "10.96.0.10:80", now),
            Ok(Allowed::Mesh)
        );
        assert!(matches!(
            decide_for("shop", &nothing, "192.0.2.10:5432", now),
            Ok(Allowed::Listed { .. })
        ));
        assert!(matches!(
            decide_for("shop", &nothing, "192.0.2.10:22", now),
            Err(EgressDenied::PortNotListed { .. })
        ));
        assert!(matches!(
            decide_for("billing", &nothing, "198.51.100.7:22", now),
            Ok(Allowed::Listed { .. })
        ));
        assert!(
            matches!(
                decide_for("shop", &nothing, "198.51.100.7:22", now),
                Err(EgressDenied::Unlisted { .. })
            ),
            "exported to its own namespace only"
        );
    }

    #[test]
    fn resolved_addresses_are_reached_while_their_answer_lives() {
        let (resolved, now) = (Resolved::default(), Instant::now());
        let ttl = Duration::from_secs(60);
        resolved.record("api.payments.example", &[ip("203.0.113.5")], ttl, now);
        resolved.record("img.cdn.example", &[ip("203.0.113.6")], ttl, now);
        resolved.record("other.example", &[ip("203.0.113.7")], ttl, now);
        assert!(matches!(
            decide_for("shop", &resolved, "203.0.113.5:443", now),
            Ok(Allowed::Resolved { .. })
        ));
        assert!(
            matches!(
                decide_for("shop", &resolved, "203.0.113.6:443", now),
                Ok(Allowed::Resolved { .. })
            ),
            "a wildcard host"
        );
        assert!(matches!(
            decide_for("shop", &resolved, "203.0.113.5:80", now),
            Err(EgressDenied::PortNotListed { .. })
        ));
        assert!(matches!(
            decide_for("shop", &resolved, "203.0.113.7:443", now),
            Err(EgressDenied::Unlisted { .. })
        ));
        let later = now + ttl + Duration::from_secs(1);
        assert!(matches!(
            decide_for("shop", &resolved, "203.0.113.5:443", later),
            Err(EgressDenied::Expired { .. })
        ));
    }

    #[test]
    fn a_short_ttl_still_leaves_time_to_connect() {
        let (resolved, now) = (Resolved::default(), Instant::now());
        resolved.record(
            "api.payments.example",
            &[ip("203.0.113.5")],
            Duration::ZERO,
            now,
        );
        let soon = now + MIN_ANSWER_LIFETIME - Duration::from_secs(1);
        assert!(decide_for("shop", &resolved, "203.0.113.5:443", soon).is_ok());
    }

    #[test]
    fn the_oldest_answers_are_forgotten_past_the_bound() {
        let (resolved, now) = (Resolved::default(), Instant::now());
        let ttl = Duration::from_secs(60);
        for i in 0..=MAX_RESOLVED_PER_POD {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
            resolved.record("api.payments.example", &[ip], ttl, now);
        }
        assert!(resolved.names_of(ip("10.0.0.0"), now).is_empty());
        assert_eq!(resolved.names_of(ip("10.0.0.1"), now).len(), 1);

        // An address answered again moves to the back: it outlives those answered since.
        resolved.record("api.payments.example", &[ip("10.0.0.1")], ttl, now);
        for i in 0..MAX_RESOLVED_PER_POD as u32 - 1 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            resolved.record("api.payments.example", &[ip], ttl, now);
        }
        assert_eq!(resolved.names_of(ip("10.0.0.1"), now).len(), 1);
        assert!(resolved.names_of(ip("10.0.0.2"), now).is_empty());
    }

    #[test]
    fn an_address_keeps_a_bounded_number_of_names() {
        let (resolved, now) = (Resolved::default(), Instant::now());
        for i in 0..100u64 {
            let name = format!("n{i}.cdn.example");
            let ttl = Duration::from_secs(60 + i);
            resolved.record(&name, &[ip("203.0.113.9")], ttl, now);
        }
        let names = resolved.names_of(ip("203.0.113.9"), now);
        assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
        assert!(names.iter().any(|(name, _)| &**name == "n99.cdn.example"));
    }

    #[test]
    fn wildcards_match_names_under_them_only() {
        let wildcard = HostPattern::parse("*.Example.com.").unwrap();
        assert!(wildcard.matches("a.example.com"));
        assert!(wildcard.matches("a.b.example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("badexample.com"));
        assert_eq!(wildcard.to_string(), "*.example.com");
        for refused in ["*", "*example.com", "a.*.com", "", "a..b", "a b.com"] {
            assert!(HostPattern::parse(refused).is_err(), "{refused:?}");
        }
    }
}
