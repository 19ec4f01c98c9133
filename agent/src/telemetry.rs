//! What the agent tells about the traffic it carries: Istio's metrics and ambit's own
//! ([`Metrics`]), the connections open right now, and the baseline of edges seen so far. The
//! proxies account for each connection through a connection record (`access`).

mod baseline;
mod connections;
mod labels;
mod metrics;
mod series;
mod suggest;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) use baseline::Baseline;
pub use baseline::Edge;
pub use connections::{ConnectionView, Direction, Meter};
pub(crate) use connections::{Connections, Endpoints, Listed, Metered};
pub use labels::{Reporter, ResponseFlags, TrafficLabels};
pub use metrics::Metrics;
pub(crate) use metrics::RequestMetrics;
pub use series::Series;
pub(crate) use series::remove_departed;
pub use suggest::suggest_policies;

/// The telemetry of one agent, shared by all its proxies.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub(crate) connections: Arc<Connections>,
    pub(crate) baseline: Baseline,
    /// The cluster the agent's workloads are in (`--cluster-id`), for Istio's `*_cluster`
    /// labels.
    pub(crate) cluster: String,
}

impl Telemetry {
    /// Telemetry of the workloads of `cluster`, whose baseline learns for `baseline_learn`
    /// before it reports new edges.
    pub fn new(metrics: Metrics, baseline_learn: Duration, cluster: String) -> Self {
        let new_edges = metrics.new_edges.clone();
        Self {
            metrics,
            connections: Arc::default(),
            baseline: Baseline::new(baseline_learn, new_edges),
            cluster,
        }
    }
}

impl Default for Telemetry {
    /// For HBONE outside any agent (tests, tools): nothing is exported.
    fn default() -> Self {
        Self::new(
            Metrics::new(),
            Duration::MAX,
            ambit_ca::DEFAULT_CLUSTER_ID.to_owned(),
        )
    }
}

pub(crate) fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
