//! Istio's series, one per label set, shared by the connections open under it, and their
//! removal once the workloads they name left the cluster, so that their number follows the
//! workloads there are, not every workload there ever was.
//!
//! A connection finds its [`Series`] with one hash lookup in the [`SeriesIndex`], and counts
//! through the counters the series holds: the families are looked up when a label set is new,
//! not per connection. prometheus-client's `Family` can remove a label set but not list them,
//! so the index is also what [`remove_departed`] sweeps: it notes since when each workload a
//! label set names has been missing from the cluster state, on each change and periodically,
//! and removes the series of a workload that has been missing for the grace period.
//!
//! A series is removed only once no open connection holds it. A connection that outlives its
//! workload's departure (a pod being deleted, draining) keeps counting into its series, and the
//! series goes at the first sweep after it closes. Removing it under the connection would lose
//! the bytes and the close it still has to count.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Telemetry;
use super::labels::TrafficLabels;
use super::metrics::TrafficMetrics;
use crate::drain::DrainWatcher;
use crate::state::ClusterState;

/// The series of one label set: its labels and the counters they select in Istio's families.
#[derive(Debug)]
pub struct Series {
    labels: TrafficLabels,
    opened: Counter,
    /// Taken when a connection under the labels first carries bytes: labels whose connections
    /// were all refused have no byte series, nor a close without response flags.
    carried: OnceLock<Carried>,
}

/// The counters of the connections that carried bytes under a label set.
#[derive(Debug)]
pub(crate) struct Carried {
    pub(crate) closed: Counter,
    /// What the client sent (Istio's "received during request").
    pub(crate) client_bytes: Counter,
    /// What the server sent (Istio's "sent during response").
    pub(crate) server_bytes: Counter,
}

impl Series {
    pub(crate) fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// The counters of connections that carry bytes, taken from `traffic` (the families the
    /// series was opened in) the first time.
    pub(crate) fn carried(&self, traffic: &TrafficMetrics) -> &Carried {
        self.carried.get_or_init(|| Carried {
            closed: traffic.closed.get_or_create(&self.labels).clone(),
            client_bytes: traffic.received.get_or_create(&self.labels).clone(),
            server_bytes: traffic.sent.get_or_create(&self.labels).clone(),
        })
    }
}

/// The series there are, each with since when its workloads have been missing.
#[derive(Debug, Default)]
pub(crate) struct SeriesIndex {
    sets: Mutex<HashMap<Indexed, Departures>>,
    /// Held by a new label set while it takes its counter from a family, and by a sweep while
    /// it removes series from the families: a counter taken meanwhile could be one the family
    /// is dropping, and would count into nothing. Connections under known labels never take it;
    /// whoever does, takes it before `sets`.
    family_changes: Mutex<()>,
}

/// A series in the index, found by its labels.
#[derive(Debug)]
struct Indexed(Arc<Series>);

impl Borrow<TrafficLabels> for Indexed {
    fn borrow(&self) -> &TrafficLabels {
        &self.0.labels
    }
}

impl Hash for Indexed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.labels.hash(state);
    }
}

impl PartialEq for Indexed {
    fn eq(&self, other: &Self) -> bool {
        self.0.labels == other.0.labels
    }
}

impl Eq for Indexed {}

/// Since when the source's and the destination's workloads have been missing from the cluster
/// state, as far as the sweeps have seen; `None` while present (or `unknown`).
#[derive(Debug, Default)]
struct Departures([Option<Instant>; 2]);

/// The workloads of a cluster state, by namespace and workload name, as the labels name them.
#[derive(Debug, Default)]
pub(crate) struct Workloads(HashMap<String, HashSet<String>>);

impl SeriesIndex {
    /// The series of `labels` in `traffic`, added if it is new, counted as opened.
    pub(crate) fn open(&self, labels: TrafficLabels, traffic: &TrafficMetrics) -> Arc<Series> {
        let known = lock(&self.sets)
            .get_key_value(&labels)
            .map(|(known, _)| known.0.clone());
        let series = known.unwrap_or_else(|| self.add(labels, traffic));
        series.opened.inc();
        series
    }

    /// Adds the series of `labels`, new a moment ago. Not under the index's lock: a new label
    /// set may wait for a family, which a scrape holds while it encodes, and connections under
    /// known labels need not wait with it.
    fn add(&self, labels: TrafficLabels, traffic: &TrafficMetrics) -> Arc<Series> {
        let _changes = lock(&self.family_changes);
        let series = Arc::new(Series {
            opened: traffic.opened.get_or_create(&labels).clone(),
            labels,
            carried: OnceLock::new(),
        });
        // Another connection may have added the same labels meanwhile: theirs is as good.
        match lock(&self.sets).entry(Indexed(series)) {
            Entry::Occupied(known) => known.key().0.clone(),
            Entry::Vacant(new) => {
                let series = new.key().0.clone();
                new.insert(Departures::default());
                series
            }
        }
    }

    /// Notes, as of `now`, which workloads are missing from `present`, and removes from
    /// `traffic` the series that no connection holds and one of whose workloads has been
    /// missing for `grace`. Returns how many series it removed.
    pub(crate) fn sweep(
        &self,
        traffic: &TrafficMetrics,
        present: &Workloads,
        now: Instant,
        grace: Duration,
    ) -> usize {
        let _changes = lock(&self.family_changes);
        let departed: Vec<Indexed> = lock(&self.sets)
            .extract_if(|Indexed(series), departures| {
                // Only the index holds the series: no connection is open under it, and a new
                // one would take it from the index, under the same lock.
                departures.observe(&series.labels, present, now, grace)
                    && Arc::strong_count(series) == 1
            })
            .map(|(series, _)| series)
            .collect();
        // Not under the index's lock either: removing waits for a scrape that holds a family.
        for Indexed(series) in &departed {
            traffic.remove(&series.labels);
        }
        departed.len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Departures {
    /// Updates from `present` at `now`; tells whether either workload has been missing for
    /// `grace`.
    fn observe(
        &mut self,
        labels: &TrafficLabels,
        present: &Workloads,
        now: Instant,
        grace: Duration,
    ) -> bool {
        let mut departed = false;
        for (since, end) in self.0.iter_mut().zip(labels.workloads()) {
            match end {
                Some((namespace, name)) if !present.contains(namespace, name) => {
                    let since = *since.get_or_insert(now);
                    departed |= now.duration_since(since) >= grace;
                }
                _ => *since = None,
            }
        }
        departed
    }
}

impl Workloads {
    pub(crate) fn of(state: &ClusterState) -> Self {
        let mut workloads = Self::default();
        for workload in state.workloads() {
            workloads
                .0
                .entry(workload.namespace.clone())
                .or_default()
                .insert(workload.workload_name.clone());
        }
        workloads
    }

    fn contains(&self, namespace: &str, name: &str) -> bool {
        self.0
            .get(namespace)
            .is_some_and(|names| names.contains(name))
    }
}

/// Removes the Istio series of the workloads that have been missing from `states` for `grace`,
/// looking at each new state and at least every quarter of `grace` (every second at most),
/// until a drain starts or the states end.
pub(crate) async fn remove_departed(
    telemetry: Arc<Telemetry>,
    mut states: watch::Receiver<Arc<ClusterState>>,
    grace: Duration,
    mut drain: DrainWatcher,
) {
    let mut present = Workloads::of(&states.borrow_and_update());
    let mut ticks = tokio::time::interval((grace / 4).max(Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                present = Workloads::of(&states.borrow_and_update());
            }
            _ = ticks.tick() => {}
        }
        let removed = telemetry
            .metrics
            .sweep_series(&present, Instant::now(), grace);
        if removed > 0 {
            tracing::debug!(
                removed,
                "removed the Istio series of workloads that left the cluster"
            );
        }
    }
}

#[cfg(test)]
mod tests;
