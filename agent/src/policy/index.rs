//! A namespace's AuthorizationPolicies by the principals that can match them: most policies
//! admit named callers (`from.source.principals`), so a decision among thousands of them needs
//! only those naming the connection's source, and those bound to no principal.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::engine::{Action, AuthorizationPolicy, Connection, Scope, StringMatch};
use crate::state::WaypointRef;

/// Positions in one namespace's sorted policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct PrincipalIndex {
    /// The policies any connection may match.
    unbound: Vec<usize>,
    /// The policies only these principals can match.
    bound: HashMap<String, Vec<usize>>,
    /// The scopes of the enforced ALLOW policies: whether one applies to the destination
    /// decides whether an ALLOW must match, matched or not.
    allow_scopes: ScopeIndex,
}

/// Scopes, found from what a destination has: its labels, Services and waypoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ScopeIndex {
    namespace: bool,
    /// Selectors by one of their labels (key, then value).
    selectors: HashMap<String, HashMap<String, Vec<BTreeMap<String, String>>>>,
    services: HashSet<String>,
    waypoints: HashSet<WaypointRef>,
}

impl ScopeIndex {
    fn insert(&mut self, scope: &Scope) {
        match scope {
            Scope::Namespace => self.namespace = true,
            Scope::Selector(labels) => match labels.iter().next() {
                None => self.namespace = true,
                Some((key, value)) => {
                    let selectors = self
                        .selectors
                        .entry(key.clone())
                        .or_default()
                        .entry(value.clone())
                        .or_default();
                    if !selectors.contains(labels) {
                        selectors.push(labels.clone());
                    }
                }
            },
            Scope::Services(names) => self.services.extend(names.iter().cloned()),
            Scope::Waypoint(waypoint) => {
                self.waypoints.insert(waypoint.clone());
            }
            // Decided at waypoints only, never where `decide` runs.
            Scope::Gateways(_) => {}
        }
    }

    /// Whether one of the scopes applies to `connection`'s destination.
    fn any_applies(&self, connection: &Connection<'_>) -> bool {
        let labels = connection.destination_labels;
        self.namespace
            || labels.iter().any(|(key, value)| {
                let selectors = self.selectors.get(key).and_then(|by| by.get(value));
                selectors.into_iter().flatten().any(|selector| {
                    selector
                        .iter()
                        .all(|(k, v)| labels.get(k).is_some_and(|own| own == v))
                })
            })
            || connection
                .destination_services
                .iter()
                .any(|name| self.services.contains(name))
            || connection
                .destination_waypoints
                .iter()
                .any(|waypoint| self.waypoints.contains(waypoint))
    }
}

impl PrincipalIndex {
    pub(super) fn new(policies: &[AuthorizationPolicy]) -> Self {
        let mut index = Self::default();
        for (position, policy) in policies.iter().enumerate() {
            match bound_principals(policy) {
                Some(principals) => {
                    for principal in principals {
                        let positions = index.bound.entry(principal.to_owned()).or_default();
                        if positions.last() != Some(&position) {
                            positions.push(position);
                        }
                    }
                }
                None => index.unbound.push(position),
            }
            if policy.action == Action::Allow && !policy.dry_run {
                index.allow_scopes.insert(&policy.scope);
            }
        }
        index
    }

    /// The positions, in order, of the policies a connection from `principal` may match.
    pub(super) fn candidates(&self, principal: Option<&str>) -> impl Iterator<Item = usize> + '_ {
        let bound = principal
            .and_then(|p| self.bound.get(p))
            .map_or(&[][..], Vec::as_slice);
        Merge {
            a: self.unbound.iter().copied().peekable(),
            b: bound.iter().copied().peekable(),
        }
    }

    /// Whether an enforced ALLOW policy applies to `connection`'s destination.
    pub(super) fn allow_applies(&self, connection: &Connection<'_>) -> bool {
        self.allow_scopes.any_applies(connection)
    }
}

/// The principals that alone can match `policy`: every rule names its callers by exact
/// principal. `None` when some connection of another principal, or of none, could match: a rule
/// without `from`, a source without principals or with a pattern, a rule decided without its
/// fields (L7 at L4, undecidable attributes), and a dry-run ALLOW, which counts when it applies.
fn bound_principals(policy: &AuthorizationPolicy) -> Option<Vec<&str>> {
    if policy.action == Action::Allow && policy.dry_run {
        return None;
    }
    let mut principals = Vec::new();
    for rule in &policy.rules {
        if rule.undecidable || rule.uses_l7 || rule.from.is_empty() {
            return None;
        }
        for source in &rule.from {
            for principal in source.principals.values.as_ref()? {
                match principal {
                    StringMatch::Exact(principal) => principals.push(principal.as_str()),
                    _ => return None,
                }
            }
        }
    }
    // A policy without rules matches nothing: bound to no principal at all.
    Some(principals)
}

/// Two ascending sequences as one, without duplicates.
struct Merge<A: Iterator<Item = usize>, B: Iterator<Item = usize>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A: Iterator<Item = usize>, B: Iterator<Item = usize>> Iterator for Merge<A, B> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match (self.a.peek().copied(), self.b.peek().copied()) {
            (Some(a), Some(b)) if a < b => self.a.next(),
            (Some(a), Some(b)) if b < a => self.b.next(),
            (Some(_), Some(_)) => {
                self.b.next();
                self.a.next()
            }
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ambit_identity::Identity;

    use super::super::engine::{
        AuthorizationPolicies, Connection, Field, Operation, PolicyName, Rule, Source, decide_among,
    };
    use super::*;

    const PRINCIPALS: [&str; 4] = [
        "cluster.local/ns/shop/sa/frontend",
        "cluster.local/ns/ops/sa/admin",
        "cluster.local/ns/shop/sa/caller-1",
        "cluster.local/ns/shop/sa/caller-2",
    ];

    fn pick<T: Clone>(rng: &mut fastrand::Rng, from: &[T]) -> T {
        from[rng.usize(..from.len())].clone()
    }

    fn source(rng: &mut fastrand::Rng) -> Source {
        let principals = match rng.u8(..4) {
            0 => Field::default(),
            1 => Field {
                values: Some(vec![StringMatch::Prefix("cluster.local/ns/shop/".into())]),
                not_values: None,
            },
            _ => Field {
                // Sometimes none at all, which nothing matches.
                values: Some(
                    (0..rng.usize(..3))
                        .map(|_| StringMatch::Exact(pick(rng, &PRINCIPALS).into()))
                        .collect(),
                ),
                not_values: (rng.u8(..4) == 0)
                    .then(|| vec![StringMatch::Exact(pick(rng, &PRINCIPALS).into())]),
            },
        };
        let namespaces = if rng.u8(..4) == 0 {
            Field {
                values: Some(vec![StringMatch::Exact("ops".into())]),
                not_values: None,
            }
        } else {
            Field::default()
        };
        Source {
            principals,
            namespaces,
            ..Source::default()
        }
    }

    fn rule(rng: &mut fastrand::Rng) -> Rule {
        let ports = |port| Operation {
            ports: Field {
                values: Some(vec![port]),
                not_values: None,
            },
            ..Operation::default()
        };
        Rule {
            from: (0..rng.usize(..3)).map(|_| source(rng)).collect(),
            to: match rng.u8(..3) {
                0 => vec![ports(8080)],
                1 => vec![ports(9090)],
                _ => Vec::new(),
            },
            when: Vec::new(),
            uses_l7: rng.u8(..10) == 0,
            undecidable: rng.u8(..20) == 0,
        }
    }

    fn waypoint() -> WaypointRef {
        WaypointRef {
            namespace: "shop".into(),
            name: "wp".into(),
        }
    }

    fn policy(rng: &mut fastrand::Rng, index: usize) -> AuthorizationPolicy {
        let app = |app: &str| Scope::Selector([("app".to_owned(), app.to_owned())].into());
        let front = Scope::Selector(
            [("app", "web"), ("tier", "front")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
        );
        let scopes = [
            Scope::Namespace,
            app("web"),
            app("db"),
            app(&format!("svc-{}", rng.u8(..3))),
            front,
            Scope::Services(vec!["web".into()]),
            Scope::Waypoint(waypoint()),
            Scope::Gateways(vec!["wp".into()]),
        ];
        AuthorizationPolicy {
            name: PolicyName {
                namespace: pick(rng, &["istio-system", "shop"]).into(),
                name: format!("p{index:03}"),
            },
            scope: pick(rng, &scopes),
            action: pick(
                rng,
                &[Action::Allow, Action::Allow, Action::Deny, Action::Audit],
            ),
            dry_run: rng.u8(..6) == 0,
            rules: (0..rng.usize(..3)).map(|_| rule(rng)).collect(),
        }
    }

    /// The index decides as evaluating every policy that applies would, deciding policy
    /// included, over random policy sets and connections.
    #[test]
    fn decides_as_evaluating_every_policy() {
        let mut rng = fastrand::Rng::with_seed(7);
        let identities: Vec<Option<Identity>> = PRINCIPALS
            .iter()
            .map(|p| Some(format!("spiffe://{p}").parse().unwrap()))
            .chain([None])
            .collect();
        let services = ["web".to_owned()];
        let waypoints = [waypoint()];
        for _ in 0..500 {
            let count = rng.usize(..12);
            // Sometimes the destination's namespace is the root one.
            let root = pick(&mut rng, &["istio-system", "istio-system", "shop"]);
            let policies =
                AuthorizationPolicies::new(root, (0..count).map(|i| policy(&mut rng, i)));
            for _ in 0..20 {
                let identity = pick(&mut rng, &identities);
                let app = pick(&mut rng, &["web", "db", "svc-1"]);
                let mut labels: BTreeMap<String, String> =
                    [("app".to_owned(), app.to_owned())].into();
                if rng.bool() {
                    labels.insert("tier".into(), "front".into());
                }
                let connection = Connection {
                    source_ip: "10.0.1.10".parse().unwrap(),
                    source_identity: identity.as_ref(),
                    destination_ip: "10.0.2.10".parse().unwrap(),
                    destination_port: pick(&mut rng, &[8080, 9090]),
                    destination_namespace: "shop",
                    destination_labels: &labels,
                    destination_services: if rng.bool() { &services } else { &[] },
                    destination_waypoints: if rng.bool() { &waypoints } else { &[] },
                    request: None,
                };
                let expected = decide_among(policies.applicable(&connection), false, &connection);
                assert_eq!(
                    policies.decide(&connection),
                    expected,
                    "{policies:#?}\n{connection:?}"
                );
            }
        }
    }

    #[test]
    fn merges_in_order_without_duplicates() {
        let merged: Vec<usize> = Merge {
            a: [1, 3, 5].into_iter().peekable(),
            b: [2, 3, 6].into_iter().peekable(),
        }
        .collect();
        assert_eq!(merged, [1, 2, 3, 5, 6]);
    }
}
