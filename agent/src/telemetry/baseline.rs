//! The traffic baseline: every distinct edge (source identity → destination workload, identity
//! and port) into this node's pods, with when it was first and last seen. After the learning
//! period, an edge never seen before is logged and counted, so that a new flow stands out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ambit_identity::Identity;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use crate::state::Workload;

/// Edges beyond this many are counted as new but not remembered, so that a scan cannot grow
/// the agent without bound.
const MAX_EDGES: usize = 10_000;

/// Labels that differ between pods of one workload or between its revisions: never part of a
/// suggested selector.
const POD_SPECIFIC_LABELS: [&str; 4] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EdgeKey {
    source: Identity,
    destination: Identity,
    namespace: String,
    workload: String,
    port: u16,
}

#[derive(Debug)]
struct EdgeSeen {
    /// The destination's labels that select every pod of its workload.
    selector: BTreeMap<String, String>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    connections: u64,
}

/// The edges seen by this node's inbound proxies.
#[derive(Debug)]
pub(crate) struct Baseline {
    /// `None`: learning never ends.
    learn_until: Option<Instant>,
    edges: Mutex<HashMap<EdgeKey, EdgeSeen>>,
    new_edges: Counter,
}

impl Baseline {
    pub(crate) fn new(learn: Duration, new_edges: Counter) -> Self {
        Self {
            learn_until: Instant::now().checked_add(learn),
            edges: Mutex::default(),
            new_edges,
        }
    }

    /// Records an authenticated connection that was allowed to `port` of `destination`.
    pub(crate) fn observe(
        &self,
        source: &Identity,
        destination: &Workload,
        destination_identity: &Identity,
        port: u16,
    ) {
        let key = EdgeKey {
            source: source.clone(),
            destination: destination_identity.clone(),
            namespace: destination.namespace.clone(),
            workload: destination.workload_name.clone(),
            port,
        };
        let now = SystemTime::now();
        let mut edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(seen) = edges.get_mut(&key) {
            seen.last_seen = now;
            seen.connections += 1;
            return;
        }
        if self
            .learn_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.new_edges.inc();
            tracing::warn!(
                target: "baseline",
                port,
                src.identity = %key.source,
                dst.identity = %key.destination,
                dst.workload = format!("{}/{}", key.namespace, key.workload),
                "new edge: never seen during the learning period"
            );
        }
        if edges.len() >= MAX_EDGES {
            return;
        }
        let selector = destination
            .labels
            .iter()
            .filter(|(k, _)| !POD_SPECIFIC_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        edges.insert(
            key,
            EdgeSeen {
                selector,
                first_seen: now,
                last_seen: now,
                connections: 1,
            },
        );
    }

    /// Every edge, sorted by destination then source.
    pub(crate) fn edges(&self) -> Vec<Edge> {
        let edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        let mut edges: Vec<Edge> = edges
            .iter()
            .map(|(key, seen)| Edge {
                source_identity: key.source.to_string(),
                destination_identity: key.destination.to_string(),
                destination_namespace: key.namespace.clone(),
                destination_workload: key.workload.clone(),
                destination_selector: seen.selector.clone(),
                port: key.port,
                first_seen: super::unix_seconds(seen.first_seen),
                last_seen: super::unix_seconds(seen.last_seen),
                connections: seen.connections,
            })
            .collect();
        edges.sort_by(|a, b| {
            (
                &a.destination_namespace,
                &a.destination_workload,
                a.port,
                &a.source_identity,
            )
                .cmp(&(
                    &b.destination_namespace,
                    &b.destination_workload,
                    b.port,
                    &b.source_identity,
                ))
        });
        edges
    }
}

/// One edge of the baseline, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub source_identity: String,
    pub destination_identity: String,
    pub destination_namespace: String,
    pub destination_workload: String,
    /// Labels that select the destination workload's pods.
    pub destination_selector: BTreeMap<String, String>,
    pub port: u16,
    /// Seconds since the Unix epoch.
    pub first_seen: u64,
    pub last_seen: u64,
    pub connections: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Locality, Protocol, WorkloadUid};

    fn backend() -> Workload {
        Workload {
            uid: WorkloadUid("u1".into()),
            name: "backend-5d8f9c-abcde".into(),
            workload_name: "backend".into(),
            namespace: "shop".into(),
            service_account: "backend".into(),
            node: "node1".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            labels: [("app", "backend"), ("pod-template-hash", "5d8f9c")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            protocol: Protocol::Hbone,
            locality: Locality::default(),
            waypoint: None,
        }
    }

    fn identity(account: &str) -> Identity {
        format!("spiffe://cluster.local/ns/shop/sa/{account}")
            .parse()
            .unwrap()
    }

    #[test]
    fn edges_first_seen_after_learning_are_counted_once() {
        let new_edges = Counter::default();
        let baseline = Baseline::new(Duration::ZERO, new_edges.clone());
        let (frontend, jobs, server) =
            (identity("frontend"), identity("jobs"), identity("backend"));
        baseline.observe(&frontend, &backend(), &server, 8080);
        baseline.observe(&frontend, &backend(), &server, 8080);
        baseline.observe(&jobs, &backend(), &server, 8080);
        assert_eq!(new_edges.get(), 2);

        let edges = baseline.edges();
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].source_identity, frontend.as_str());
        assert_eq!(edges[0].connections, 2);
        assert_eq!(
            edges[0].destination_selector,
            [("app".to_owned(), "backend".to_owned())].into(),
            "labels of one pod or revision never select"
        );
    }

    #[test]
    fn nothing_is_new_while_learning() {
        let new_edges = Counter::default();
        let baseline = Baseline::new(Duration::from_secs(3600), new_edges.clone());
        baseline.observe(
            &identity("frontend"),
            &backend(),
            &identity("backend"),
            8080,
        );
        assert_eq!(new_edges.get(), 0);
        assert_eq!(baseline.edges().len(), 1);
    }
}
