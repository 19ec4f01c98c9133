//! The certificate service's Prometheus metrics.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::refusal::code_label;

/// Requests by outcome, when the roots expire, and failures to reload the CA or publish its
/// roots.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    requests: Family<RequestLabels, Counter>,
    root_expiry: Gauge,
    root_publish_failures: Counter,
    reload_failures: Counter,
}

/// How a request ended: both labels take a few fixed values only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    code: &'static str,
    reason: &'static str,
}

impl Metrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            root_expiry: Gauge::default(),
            root_publish_failures: Counter::default(),
            reload_failures: Counter::default(),
        };
        registry.register(
            "ambit_ca_requests",
            "CreateCertificate requests, by gRPC code and a reason for refusals (issued for OK)",
            metrics.requests.clone(),
        );
        // Istio's name, so that istiod's alerts on an expiring root apply as they are.
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "When the earliest of the CA's roots expires (Unix time, seconds)",
            metrics.root_expiry.clone(),
        );
        registry.register(
            "ambit_ca_root_publish_failures",
            "Attempts to publish the roots in their ConfigMap that failed (each retried at the next poll)",
            metrics.root_publish_failures.clone(),
        );
        registry.register(
            "ambit_ca_reload_failures",
            "Loads of a changed CA directory that failed (the previous CA signs meanwhile; each retried at the next poll)",
            metrics.reload_failures.clone(),
        );
        metrics
    }

    pub(crate) fn count(&self, code: tonic::Code, reason: &'static str) {
        let code = code_label(code);
        self.requests
            .get_or_create(&RequestLabels { code, reason })
            .inc();
    }

    pub(crate) fn count_root_publish_failure(&self) {
        self.root_publish_failures.inc();
    }

    pub(crate) fn count_reload_failure(&self) {
        self.reload_failures.inc();
    }

    pub(crate) fn set_root_expiry(&self, not_after: SystemTime) {
        let seconds = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.root_expiry
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn exports_requests_and_root_expiry() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.count(tonic::Code::PermissionDenied, "no_pod_on_node");
        metrics.count(tonic::Code::Ok, "issued");
        metrics.set_root_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        metrics.count_root_publish_failure();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "ambit_ca_requests_total{code=\"PermissionDenied\",reason=\"no_pod_on_node\"} 1",
            "ambit_ca_requests_total{code=\"OK\",reason=\"issued\"} 1",
            "citadel_server_root_cert_expiry_timestamp 1900000000",
            "ambit_ca_root_publish_failures_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
