//! Removing the Istio series of workloads that left the cluster, so that their number follows
//! the workloads there are, not every workload there ever was. prometheus-client's `Family` can
//! remove a label set but not list them, so [`SeriesIndex`] keeps each label set under which
//! series were created, shared with the connections open under it, and notes since when each
//! workload it names has been missing from the cluster state. [`remove_departed`] looks at the
//! state on each change and periodically, and removes the series of a workload that has been
//! missing for the grace period.
//!
//! A series is removed only once no open connection holds its labels. A connection that outlives
//! its workload's departure (a pod being deleted, draining) keeps counting into its series, and
//! the series goes at the first sweep after it closes. Removing it under the connection would
//! cost no memory (the connection keeps its own handle on the counters until it closes) but would
//! lose the bytes and the close it still has to count.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Telemetry;
use super::labels::TrafficLabels;
use super::metrics::TrafficMetrics;
use crate::drain::DrainWatcher;
use crate::state::ClusterState;

/// The label sets of Istio's series, each with since when its workloads have been missing.
#[derive(Debug, Default)]
pub(crate) struct SeriesIndex {
    sets: Mutex<HashMap<Arc<TrafficLabels>, Departures>>,
}

/// Since when the source's and the destination's workloads have been missing from the cluster
/// state, as far as the sweeps have seen; `None` while present (or `unknown`).
#[derive(Debug, Default)]
struct Departures([Option<Instant>; 2]);

/// The workloads of a cluster state, by namespace and workload name, as the labels name them.
#[derive(Debug, Default)]
pub(crate) struct Workloads(HashMap<String, HashSet<String>>);

impl SeriesIndex {
    /// The shared label set equal to `labels`, added if it is new. One hash lookup: the labels
    /// are moved into their `Arc` before it, and that allocation is the connection's only one
    /// for its labels.
    pub(crate) fn intern(&self, labels: TrafficLabels) -> Arc<TrafficLabels> {
        match self.lock().entry(Arc::new(labels)) {
            Entry::Occupied(known) => known.key().clone(),
            Entry::Vacant(new) => {
                let labels = new.key().clone();
                new.insert(Departures::default());
                labels
            }
        }
    }

    /// Notes, as of `now`, which workloads are missing from `present`, and removes from
    /// `traffic` the series of every label set that no connection holds and one of whose
    /// workloads has been missing for `grace`. Returns how many label sets it removed.
    pub(crate) fn sweep(
        &self,
        traffic: &TrafficMetrics,
        present: &Workloads,
        now: Instant,
        grace: Duration,
    ) -> usize {
        let mut sets = self.lock();
        let before = sets.len();
        sets.retain(|labels, departures| {
            let departed = departures.observe(labels, present, now, grace);
            // Only the index holds the labels: no connection is open under them. A new one
            // would take them from the index, under the same lock.
            let remove = departed && Arc::strong_count(labels) == 1;
            if remove {
                traffic.remove(labels);
            }
            !remove
        });
        before - sets.len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<TrafficLabels>, Departures>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
