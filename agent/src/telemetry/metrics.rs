//! The agent's Prometheus metrics: Istio's TCP metrics, with Istio's names and labels, so that
//! existing dashboards and Kiali read them unchanged, and ambit's own under `ambit_`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ambit_identity::CertificateManager;
use ambit_redirect::CaptureBackend;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::labels::{Reporter, RequestLabels, ResponseFlags, TrafficLabels};
use super::series::{Series, SeriesIndex, Workloads};
use crate::egress::EgressDenied;
use crate::hbone::HboneClient;
use crate::logging::DroppedLines;
use crate::state::Workload;

/// Every metric the agent exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) traffic: TrafficMetrics,
    /// Istio's `istio_tcp_sockets_open`: sockets accepted and not yet closed, by reporter.
    open_sockets: Family<SocketLabels, Gauge>,
    /// The label sets of `traffic`'s series, for removing those of workloads that left.
    series: SeriesIndex,
    /// Pods of this node whose traffic is captured.
    pub(crate) enrolled_pods: Gauge,
    /// Pods of this node refused capture: the node contradicts what the cluster says of them.
    pub(crate) refused_pods: Gauge,
    pub(crate) capture_failures: Family<StageLabel, Counter>,
    pub(crate) policy_decisions: Family<DecisionLabel, Counter>,
    pub(crate) new_edges: Counter,
    egress_denied: Family<EgressDeniedLabels, Counter>,
}

/// The labels of `ambit_egress_denied_total`: who was refused, where to (the ServiceEntry host
/// the address is known by, else `unknown`), and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EgressDeniedLabels {
    source_workload: String,
    source_workload_namespace: String,
    destination_host: String,
    reason: &'static str,
}

/// Istio's TCP metrics, reported by both ends of a connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrafficMetrics {
    pub(crate) opened: Family<TrafficLabels, Counter>,
    pub(crate) closed: Family<TrafficLabels, Counter>,
    pub(crate) failed: Family<TrafficLabels, Counter>,
    /// Bytes from the server back to the client (Istio: "sent during response").
    pub(crate) sent: Family<TrafficLabels, Counter>,
    /// Bytes from the client to the server (Istio: "received during request").
    pub(crate) received: Family<TrafficLabels, Counter>,
}

impl TrafficMetrics {
    /// Removes the series of `labels` from every family, with each response flag.
    pub(crate) fn remove(&self, labels: &TrafficLabels) {
        for family in [&self.opened, &self.closed, &self.sent, &self.received] {
            family.remove(labels);
        }
        for flags in [ResponseFlags::Deny, ResponseFlags::Connect] {
            let refused = labels.with_flags(flags);
            self.closed.remove(&refused);
            self.failed.remove(&refused);
        }
    }
}

/// The label of `istio_tcp_sockets_open`, as ztunnel's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SocketLabels {
    reporter: &'static str,
}

/// An accepted socket, counted as open until dropped.
#[derive(Debug)]
pub(crate) struct OpenSocket(Gauge);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Istio's HTTP metrics, as a waypoint reports them.
#[derive(Debug, Clone)]
pub(crate) struct RequestMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    /// Until the response's headers, in milliseconds.
    pub(crate) duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// Body bytes, as they are copied.
    pub(crate) request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub(crate) response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

/// Envoy's default buckets, which Istio's HTTP metrics keep: milliseconds, or bytes.
fn envoy_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

/// Where enrolling a pod failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct StageLabel {
    pub(crate) stage: &'static str,
}

/// What authorization decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DecisionLabel {
    pub(crate) decision: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    crypto_provider: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            traffic: TrafficMetrics::default(),
            open_sockets: Family::default(),
            series: SeriesIndex::default(),
            enrolled_pods: Gauge::default(),
            refused_pods: Gauge::default(),
            capture_failures: Family::default(),
            policy_decisions: Family::default(),
            new_edges: Counter::default(),
            egress_denied: Family::default(),
        };
        let traffic = &metrics.traffic;
        let istio = metrics.registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            traffic.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            traffic.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "TCP connections that were never established: denied (DENY) or the upstream was unreachable (CONNECT)",
            traffic.failed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent from the server to the client",
            traffic.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received from the client by the server",
            traffic.received.clone(),
        );
        // Both series from the start: no socket open is something to show, not a gap.
        for reporter in [Reporter::Source, Reporter::Destination] {
            let labels = SocketLabels {
                reporter: reporter.as_str(),
            };
            metrics.open_sockets.get_or_create(&labels).set(0);
        }
        istio.register(
            "tcp_sockets_open",
            "TCP sockets accepted and still open: the pods' outbound connections (source) and the HBONE and plaintext connections into them (destination)",
            metrics.open_sockets.clone(),
        );

        let ambit = metrics.registry.sub_registry_with_prefix("ambit");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                crypto_provider: ambit_identity::CRYPTO_PROVIDER_NAME,
            })
            .set(1);
        ambit.register(
            "build_info",
            "The agent's version and crypto provider",
            build,
        );
        ambit.register(
            "enrolled_pods",
            "Pods of this node whose traffic is captured",
            metrics.enrolled_pods.clone(),
        );
        ambit.register(
            "refused_pods",
            "Pods of this node left uncaptured because their network namespace is ambiguous or lacks their IP",
            metrics.refused_pods.clone(),
        );
        ambit.register(
            "capture_failures",
            "Failed attempts to enrol or release a pod, by stage",
            metrics.capture_failures.clone(),
        );
        ambit.register(
            "policy_decisions",
            "Authorization decisions on inbound connections",
            metrics.policy_decisions.clone(),
        );
        ambit.register(
            "new_edges",
            "Connections on an edge (source identity, destination identity and port) first seen after the baseline's learning period",
            metrics.new_edges.clone(),
        );
        ambit.register(
            "egress_denied",
            "Connections from enrolled pods to destinations outside the mesh that REGISTRY_ONLY refused, by source, ServiceEntry host and reason",
            metrics.egress_denied.clone(),
        );
        metrics
    }

    /// Counts a connection from `source` that egress control refused.
    pub(crate) fn egress_denied(&self, source: &Workload, denied: &EgressDenied) {
        let labels = EgressDeniedLabels {
            source_workload: source.workload_name.clone(),
            source_workload_namespace: source.namespace.clone(),
            destination_host: denied.host().unwrap_or("unknown").to_owned(),
            reason: denied.reason(),
        };
        self.egress_denied.get_or_create(&labels).inc();
    }

    /// Reports the expiry of every certificate `certificates` keeps renewed, the connections
    /// and streams of `client`'s pool, and what `capture`'s kernel programs counted, read at
    /// each scrape.
    pub fn register_node(
        &mut self,
        certificates: Arc<CertificateManager>,
        client: HboneClient,
        capture: Arc<dyn CaptureBackend>,
    ) {
        let ambit = self.registry.sub_registry_with_prefix("ambit");
        ambit.register_collector(Box::new(CertificateExpiry(certificates)));
        ambit.register_collector(Box::new(PoolUsage(client)));
        ambit.register_collector(Box::new(CaptureCounts(capture)));
    }

    /// Registers Istio's HTTP metrics, which a waypoint reports.
    pub(crate) fn register_requests(&mut self) -> RequestMetrics {
        let histograms = || Family::new_with_constructor(envoy_histogram as fn() -> Histogram);
        let metrics = RequestMetrics {
            requests: Family::default(),
            duration: histograms(),
            request_bytes: histograms(),
            response_bytes: histograms(),
        };
        let istio = self.registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests", metrics.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration, until the response's headers",
            metrics.duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Request body sizes",
            metrics.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes",
            metrics.response_bytes.clone(),
        );
        metrics
    }

    /// Counts a socket accepted as `reporter` as open until the returned guard drops.
    pub(crate) fn socket_opened(&self, reporter: Reporter) -> OpenSocket {
        let labels = SocketLabels {
            reporter: reporter.as_str(),
        };
        let gauge = self.open_sockets.get_or_create(&labels).clone();
        gauge.inc();
        OpenSocket(gauge)
    }

    /// The sockets accepted and still open, as `istio_tcp_sockets_open` counts them.
    pub(crate) fn open_sockets(&self) -> u64 {
        let open: i64 = [Reporter::Source, Reporter::Destination]
            .into_iter()
            .map(|reporter| {
                let labels = SocketLabels {
                    reporter: reporter.as_str(),
                };
                self.open_sockets.get_or_create(&labels).get()
            })
            .sum();
        u64::try_from(open).unwrap_or(0)
    }

    /// Registers Istio's DNS metrics, and the DNS proxy's own.
    pub(crate) fn register_dns(&mut self) -> ambit_dns::DnsMetrics {
        ambit_dns::DnsMetrics::register(&mut self.registry)
    }

    /// Where a module registers metrics of its own, under ambit's prefix.
    pub(crate) fn ambit_registry(&mut self) -> &mut Registry {
        self.registry.sub_registry_with_prefix("ambit")
    }

    /// Reports the log lines dropped because stderr did not keep up, read at each scrape.
    pub(crate) fn register_logging(&mut self, dropped: DroppedLines) {
        let ambit = self.registry.sub_registry_with_prefix("ambit");
        ambit.register_collector(Box::new(LogLinesDropped(dropped)));
    }

    /// The exposition text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(64 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a connection opened, under `labels`. The connection holds the returned series
    /// while it is open, and counts into it: the series stays as long as it is held.
    pub fn opened(&self, labels: TrafficLabels) -> Arc<Series> {
        self.series.open(labels, &self.traffic)
    }

    /// Removes the Istio series that no open connection holds and that name a workload missing
    /// from `present` for `grace` (as of `now`); tells how many label sets went.
    pub(crate) fn sweep_series(
        &self,
        present: &Workloads,
        now: tokio::time::Instant,
        grace: Duration,
    ) -> usize {
        self.series.sweep(&self.traffic, present, now, grace)
    }

    /// Counts a failed enrolment or release step.
    pub(crate) fn capture_failed(&self, stage: &'static str) {
        self.capture_failures
            .get_or_create(&StageLabel { stage })
            .inc();
    }

    pub(crate) fn decided(&self, decision: &'static str) {
        self.policy_decisions
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// `ambit_certificate_expiry_timestamp_seconds` and `ambit_certificate_requests_total`, read
/// from the certificate manager at scrape.
#[derive(Debug)]
struct CertificateExpiry(Arc<CertificateManager>);

impl Collector for CertificateExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "certificate_expiry_timestamp_seconds",
            "When each workload certificate this node holds expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for status in self.0.status() {
            let Some(certificate) = status.certificate else {
                continue;
            };
            let not_after = certificate
                .not_after()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            ConstGauge::new(not_after).encode(metric.encode_family(&IdentityLabel {
                identity: certificate.identity().to_string(),
            })?)?;
        }
        let requests = self.0.requests();
        let mut metric = encoder.encode_descriptor(
            "certificate_requests",
            "Certificate requests to the CA (first certificates, renewals, retries), by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, count) in [("issued", requests.issued), ("failed", requests.failed)] {
            ConstCounter::new(count).encode(metric.encode_family(&OutcomeLabel { outcome })?)?;
        }
        Ok(())
    }
}

/// `ambit_hbone_pool_connections` and `ambit_hbone_pool_streams`, read from the pool at scrape.
#[derive(Debug)]
struct PoolUsage(HboneClient);

impl Collector for PoolUsage {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = [
            (
                "hbone_pool_connections",
                "Outbound HBONE connections open in the pool",
                self.0.pooled_connections(),
            ),
            (
                "hbone_pool_streams",
                "CONNECT streams open on pooled HBONE connections",
                self.0.pooled_streams(),
            ),
        ];
        for (name, help, value) in usage {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

/// `ambit_log_lines_dropped_total`, read from the log writer's queue at scrape.
#[derive(Debug)]
struct LogLinesDropped(DroppedLines);

impl Collector for LogLinesDropped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.0.count());
        counter.encode(encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because stderr did not take them as fast as they came",
            None,
            MetricType::Counter,
        )?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CaptureLabels {
    direction: &'static str,
    outcome: &'static str,
}

/// `ambit_capture_connections_total`, from the capture backend's kernel programs at scrape;
/// absent for a backend without programs.
#[derive(Debug)]
struct CaptureCounts(Arc<dyn CaptureBackend>);

impl Collector for CaptureCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counters) = self.0.counters() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(
            "capture_connections",
            "New connections the eBPF capture programs handed to the agent (steered) or refused for want of its listener (dropped); TCP packets to a pod they dropped because they could not classify them (unclassified: IPv4 fragments, malformed headers)",
            None,
            MetricType::Counter,
        )?;
        for (direction, outcome, value) in [
            ("inbound", "steered", counters.inbound_steered),
            ("inbound", "dropped", counters.inbound_dropped),
            ("outbound", "steered", counters.outbound_steered),
            ("outbound", "dropped", counters.outbound_dropped),
            ("inbound", "unclassified", counters.inbound_unclassified),
        ] {
            let labels = CaptureLabels { direction, outcome };
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
