//! The labels of Istio's TCP metrics, derived from the workloads at both ends.

use ambit_identity::Identity;
use prometheus_client::encoding::EncodeLabelSet;

use crate::state::{Service, Workload};

/// What Istio writes for a label it cannot know.
const UNKNOWN: &str = "unknown";

/// Which end of the connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// Istio's `response_flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    None,
    /// Denied by policy.
    Deny,
    /// The upstream could not be reached.
    Connect,
}

impl Reporter {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

impl ResponseFlags {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
        }
    }
}

/// The label set of `istio_tcp_*`, in ztunnel's order. No addresses or ports: cardinality
/// follows the workloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
    source_region: String,
    source_zone: String,
    destination_region: String,
    destination_zone: String,
}

/// Where one end of a connection is: its cluster, region and zone, `unknown` where not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement<'a> {
    pub(crate) cluster: &'a str,
    pub(crate) region: &'a str,
    pub(crate) zone: &'a str,
}

/// A workload's labels for one end, or `unknown` everywhere.
struct End {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    cluster: String,
    region: String,
    zone: String,
}

impl End {
    /// Every workload the agent knows is in its own cluster, `cluster`.
    fn new(workload: Option<&Workload>, principal: Option<&Identity>, cluster: &str) -> Self {
        let known = |value: Option<&str>| value.unwrap_or(UNKNOWN).to_owned();
        let locality = workload.map(|w| &w.locality);
        Self {
            workload: known(workload.map(|w| w.workload_name.as_str())),
            canonical_service: known(workload.map(Workload::canonical_service)),
            canonical_revision: known(workload.map(Workload::canonical_revision)),
            namespace: known(workload.map(|w| w.namespace.as_str())),
            principal: known(principal.map(Identity::as_str)),
            cluster: known(workload.map(|_| cluster)),
            region: known(locality.and_then(|l| l.region.as_deref())),
            zone: known(locality.and_then(|l| l.zone.as_deref())),
        }
    }
}

impl TrafficLabels {
    /// The labels of a connection between `source` and `destination`, with the identities each
    /// end proved (`None` for plaintext) and the service the client addressed, if any; the
    /// workloads known are in `cluster`.
    pub fn new(
        reporter: Reporter,
        cluster: &str,
        source: (Option<&Workload>, Option<&Identity>),
        destination: (Option<&Workload>, Option<&Identity>),
        service: Option<&Service>,
    ) -> Self {
        let mutual_tls = source.1.is_some() && destination.1.is_some();
        let (src, dst) = (
            End::new(source.0, source.1, cluster),
            End::new(destination.0, destination.1, cluster),
        );
        let service_field = |field: fn(&Service) -> &str| {
            service.map_or_else(|| UNKNOWN.to_owned(), |s| field(s).to_owned())
        };
        Self {
            reporter: reporter.as_str(),
            source_app: src.canonical_service.clone(),
            source_version: src.canonical_revision.clone(),
            source_workload: src.workload,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_cluster: src.cluster,
            source_region: src.region,
            source_zone: src.zone,
            destination_service: service_field(|s| &s.hostname),
            destination_service_namespace: service_field(|s| &s.namespace),
            destination_service_name: service_field(|s| &s.name),
            destination_app: dst.canonical_service.clone(),
            destination_version: dst.canonical_revision.clone(),
            destination_workload: dst.workload,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_cluster: dst.cluster,
            destination_region: dst.region,
            destination_zone: dst.zone,
            request_protocol: "tcp",
            response_flags: ResponseFlags::None.as_str(),
            // Plaintext is `unknown` to Istio.
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" },
        }
    }

    /// The same labels with `flags`.
    pub(crate) fn with_flags(&self, flags: ResponseFlags) -> Self {
        Self {
            response_flags: flags.as_str(),
            ..self.clone()
        }
    }

    /// Where the source and the destination are, as the labels say.
    pub(crate) fn placements(&self) -> [Placement<'_>; 2] {
        [
            Placement {
                cluster: &self.source_cluster,
                region: &self.source_region,
                zone: &self.source_zone,
            },
            Placement {
                cluster: &self.destination_cluster,
                region: &self.destination_region,
                zone: &self.destination_zone,
            },
        ]
    }

    /// The workloads the source and destination labels name, as (namespace, workload name);
    /// `None` for an end that is `unknown`.
    pub(crate) fn workloads(&self) -> [Option<(&str, &str)>; 2] {
        [
            (&self.source_workload_namespace, &self.source_workload),
            (
                &self.destination_workload_namespace,
                &self.destination_workload,
            ),
        ]
        .map(|(namespace, workload)| {
            (namespace != UNKNOWN || workload != UNKNOWN)
                .then_some((namespace.as_str(), workload.as_str()))
        })
    }
}

/// The label set of Istio's HTTP metrics as a waypoint reports them, in Istio's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_service: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_code: String,
    grpc_response_status: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

impl TrafficLabels {
    /// The labels of one request of `protocol` (`http`, `grpc`) carried on this connection,
    /// answered with `response_code`, as a waypoint reports it.
    pub(crate) fn request(&self, protocol: &'static str, response_code: u16) -> RequestLabels {
        RequestLabels {
            reporter: "waypoint",
            source_workload: self.source_workload.clone(),
            source_canonical_service: self.source_canonical_service.clone(),
            source_canonical_revision: self.source_canonical_revision.clone(),
            source_workload_namespace: self.source_workload_namespace.clone(),
            source_principal: self.source_principal.clone(),
            source_app: self.source_app.clone(),
            source_version: self.source_version.clone(),
            source_cluster: self.source_cluster.clone(),
            destination_workload: self.destination_workload.clone(),
            destination_workload_namespace: self.destination_workload_namespace.clone(),
            destination_principal: self.destination_principal.clone(),
            destination_app: self.destination_app.clone(),
            destination_version: self.destination_version.clone(),
            destination_service: self.destination_service.clone(),
            destination_canonical_service: self.destination_canonical_service.clone(),
            destination_canonical_revision: self.destination_canonical_revision.clone(),
            destination_service_name: self.destination_service_name.clone(),
            destination_service_namespace: self.destination_service_namespace.clone(),
            destination_cluster: self.destination_cluster.clone(),
            request_protocol: protocol,
            response_code: response_code.to_string(),
            grpc_response_status: "",
            response_flags: ResponseFlags::None.as_str(),
            // The client reached the waypoint over HBONE.
            connection_security_policy: "mutual_tls",
        }
    }
}
