//! Waypoints, bound as istiod binds them. `istio.io/use-waypoint: <name>` on a Service or a pod
//! (else on its namespace; `none` opts out) names the waypoint, the Service `<name>` in the
//! object's namespace or in `istio.io/use-waypoint-namespace`. The waypoint's own
//! `istio.io/waypoint-for` label (`service` by default, `workload`, `all`, `none`) says which
//! traffic it takes: a Service's binding holds for `service` and `all`, a pod's for `workload`
//! and `all`.
//!
//! Where istiod drops a binding to a waypoint that is not there (or to a Service that is no
//! waypoint), ambit keeps it: traffic is then refused rather than sent around the waypoint,
//! whose policies it would skip.
//!
//! The destination admits its waypoints with a policy of the agent's own, as istiod's
//! `istio_allow_waypoint_<namespace>_<name>` (`PILOT_AUTO_ALLOW_WAYPOINT_POLICY`): an ALLOW of the
//! waypoint's service accounts, applying to every workload behind the waypoint. Like any ALLOW
//! policy, it denies what no ALLOW policy allows, so a client that goes around the waypoint is
//! refused unless the workload's own ALLOW policies admit it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service as K8sService;

use super::Sourced;
use crate::policy::{
    Action, AuthorizationPolicy, Field, PolicyName, Rule, Scope, Source, StringMatch,
};
use crate::state::{Service, WaypointRef, Workload};

const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// What istiod labels the Services of the waypoints it deploys with.
const MANAGED: (&str, &str) = ("gateway.istio.io/managed", "istio.io-mesh-controller");
/// The label of a waypoint's own pods: they never go through a waypoint.
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

type Labels = BTreeMap<String, String>;

/// Which traffic a waypoint takes, by how it was addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrafficType {
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    fn of(labels: &Labels) -> Self {
        match labels.get(WAYPOINT_FOR).map(String::as_str) {
            Some("workload") => Self::Workload,
            Some("all") => Self::All,
            Some("none") => Self::None,
            // The default, and what a value istiod does not know falls back to.
            _ => Self::Service,
        }
    }
}

/// The cluster's waypoints: Services labelled `istio.io/waypoint-for`, or deployed by istiod.
pub(super) struct Waypoints {
    types: HashMap<WaypointRef, TrafficType>,
}

impl Waypoints {
    pub(super) fn new(services: &[Sourced<K8sService>]) -> Self {
        let types = services
            .iter()
            .filter_map(|service| {
                let metadata = &service.object.metadata;
                let labels = metadata.labels.as_ref()?;
                let managed = labels.get(MANAGED.0).is_some_and(|v| v == MANAGED.1);
                if !managed && !labels.contains_key(WAYPOINT_FOR) {
                    return None;
                }
                let waypoint = WaypointRef {
                    namespace: super::namespace(metadata),
                    name: metadata.name.clone()?,
                };
                Some((waypoint, TrafficType::of(labels)))
            })
            .collect();
        Self { types }
    }

    /// Whether `waypoint` takes the traffic `wanted`. A waypoint not in the cluster keeps what
    /// is bound to it: that traffic is refused until it appears.
    fn takes(&self, waypoint: &WaypointRef, wanted: TrafficType) -> bool {
        self.types
            .get(waypoint)
            .is_none_or(|kind| *kind == wanted || *kind == TrafficType::All)
    }

    /// Whether the Service `namespace/name` is a waypoint.
    pub(super) fn is_waypoint(&self, namespace: &str, name: &str) -> bool {
        self.types.contains_key(&WaypointRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The waypoint of the Service `namespace/name` with `labels`; a waypoint's own Service has
    /// none.
    pub(super) fn of_service(
        &self,
        namespace: &str,
        name: &str,
        labels: &Labels,
        namespace_labels: Option<&Labels>,
    ) -> Option<WaypointRef> {
        let own = WaypointRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if self.types.contains_key(&own) {
            return None;
        }
        binding(namespace, labels, namespace_labels)
            .filter(|waypoint| self.takes(waypoint, TrafficType::Service))
    }

    /// The waypoint of a pod of `namespace` with `labels`; a waypoint's own pods have none.
    pub(super) fn of_pod(
        &self,
        namespace: &str,
        labels: &Labels,
        namespace_labels: Option<&Labels>,
    ) -> Option<WaypointRef> {
        if labels.contains_key(GATEWAY_NAME) {
            return None;
        }
        binding(namespace, labels, namespace_labels)
            .filter(|waypoint| self.takes(waypoint, TrafficType::Workload))
    }
}

/// The waypoint an object's labels name, else its namespace's; `none` on the object opts it
/// out whatever the namespace says.
fn binding(
    namespace: &str,
    own: &Labels,
    namespace_labels: Option<&Labels>,
) -> Option<WaypointRef> {
    let labels = if own.contains_key(USE_WAYPOINT) {
        own
    } else {
        namespace_labels.filter(|labels| labels.contains_key(USE_WAYPOINT))?
    };
    let name = labels.get(USE_WAYPOINT)?;
    if name == "none" || name.is_empty() {
        return None;
    }
    let namespace = labels
        .get(USE_WAYPOINT_NAMESPACE)
        .filter(|ns| !ns.is_empty())
        .map_or(namespace, String::as_str);
    Some(WaypointRef {
        namespace: namespace.to_owned(),
        name: name.clone(),
    })
}

/// The policies that admit each waypoint in use to the workloads behind it: an ALLOW of the
/// service accounts of the waypoint's pods, the endpoints of its Service in its own namespace
/// (none while it has none, or is no waypoint: everything behind it is denied until it does),
/// in the root namespace.
pub(super) fn policies(
    workloads: &[Workload],
    services: &[Service],
    root_namespace: &str,
) -> Vec<AuthorizationPolicy> {
    let in_use: BTreeSet<&WaypointRef> = workloads
        .iter()
        .filter_map(|w| w.waypoint.as_ref())
        .chain(services.iter().filter_map(|s| s.waypoint.as_ref()))
        .collect();
    in_use
        .into_iter()
        .map(|waypoint| {
            let endpoints: BTreeSet<_> = services
                .iter()
                .filter(|s| s.namespace == waypoint.namespace && s.name == waypoint.name)
                .filter(|s| s.is_waypoint)
                .flat_map(|s| &s.endpoints)
                .map(|e| e.ip)
                .collect();
            // An EndpointSlice may list any address: only pods of the waypoint's namespace count.
            let accounts: BTreeSet<String> = workloads
                .iter()
                .filter(|w| w.namespace == waypoint.namespace)
                .filter(|w| w.ips.iter().any(|ip| endpoints.contains(ip)))
                .map(|w| format!("/ns/{}/sa/{}", w.namespace, w.service_account))
                .collect();
            let rules = if accounts.is_empty() {
                Vec::new()
            } else {
                let principals = accounts.into_iter().map(StringMatch::Suffix).collect();
                vec![Rule {
                    from: vec![Source {
                        principals: Field {
                            values: Some(principals),
                            not_values: None,
                        },
                        ..Source::default()
                    }],
                    ..Rule::default()
                }]
            };
            AuthorizationPolicy {
                name: PolicyName {
                    namespace: root_namespace.to_owned(),
                    name: format!(
                        "istio_allow_waypoint_{}_{}",
                        waypoint.namespace, waypoint.name
                    ),
                },
                scope: Scope::Waypoint(waypoint.clone()),
                action: Action::Allow,
                dry_run: false,
                rules,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
