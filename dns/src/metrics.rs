//! The proxy's metrics: ztunnel's DNS metrics, with its names, labels and buckets, and what
//! ambit drops under `ambit_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// ztunnel's buckets for `istio_dns_upstream_request_duration_seconds`.
const UPSTREAM_BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

/// The labels of Istio's DNS metrics, in ztunnel's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// The query type, lowercase: `a`, `aaaa`, `srv`.
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// Why a query was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The pod asked faster than its rate limit.
    RateLimited,
    /// The pod had as many queries waiting for an answer as it may.
    TooManyPending,
    /// The pod had as many TCP connections open to the proxy as it may.
    TooManyConnections,
    /// The node had as many queries waiting for upstream as it may.
    UpstreamBusy,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::TooManyPending => "too_many_pending",
            Self::TooManyConnections => "too_many_connections",
            Self::UpstreamBusy => "upstream_busy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DroppedLabels {
    reason: &'static str,
}

/// The proxy's metrics, shared by every pod's server.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    pub(crate) requests: Family<DnsLabels, Counter>,
    pub(crate) upstream_requests: Family<DnsLabels, Counter>,
    pub(crate) upstream_failures: Family<DnsLabels, Counter>,
    pub(crate) upstream_duration: Family<DnsLabels, Histogram>,
    dropped: Family<DroppedLabels, Counter>,
}

impl DnsMetrics {
    /// Registers Istio's metrics under `istio_`, and ambit's under `ambit_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(UPSTREAM_BUCKETS)),
            dropped: Family::default(),
        };
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "dns_requests",
            "Total number of DNS requests",
            metrics.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream",
            metrics.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "Total number of DNS requests forwarded upstream that failed or had no record",
            metrics.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Time spent waiting for upstream DNS answers",
            Unit::Seconds,
            metrics.upstream_duration.clone(),
        );
        registry.sub_registry_with_prefix("ambit").register(
            "dns_dropped",
            "DNS queries the proxy dropped unanswered, by reason",
            metrics.dropped.clone(),
        );
        metrics
    }

    pub(crate) fn dropped(&self, reason: Dropped) {
        let reason = reason.as_str();
        self.dropped.get_or_create(&DroppedLabels { reason }).inc();
    }
}
