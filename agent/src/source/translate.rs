//! The one translation of Kubernetes objects into the agent's model, whichever source they came
//! from: a pod means the same thing read from a file or served by the API server.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodStatus, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::egress::{OUTBOUND_POLICY_LABEL, OutboundTrafficPolicy, ServiceEntries};
use crate::state::{
    AppProtocol, ClusterState, Endpoint, Locality, Protocol, Service, ServicePort, TargetPort,
    Workload, WorkloadUid,
};

mod policies;
mod service_entries;
mod waypoints;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A node's region and zone, as cloud providers and Istio name them.
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The node labels the model reads.
pub(crate) const TOPOLOGY_LABELS: [&str; 2] = [REGION_LABEL, ZONE_LABEL];

/// Where an object came from, for saying what is wrong with it: its document in a file, or
/// nothing more than its kind and name when the API server served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Document(usize),
    Api,
}

/// One object, with where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Sourced<T> {
    pub(crate) origin: Origin,
    pub(crate) object: Arc<T>,
}

/// The cluster's objects, by kind. Policies stay untyped JSON: one that does not parse is
/// replaced by a fail-closed stand-in rather than fail the rest.
#[derive(Debug, Default)]
pub(crate) struct Objects {
    pub(crate) namespaces: Vec<Arc<Namespace>>,
    /// Only their names and labels are read: where pods run, for telemetry.
    pub(crate) nodes: Vec<Arc<Node>>,
    pub(crate) pods: Vec<Sourced<Pod>>,
    pub(crate) services: Vec<Sourced<K8sService>>,
    pub(crate) endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub(crate) authorization_policies: Vec<Sourced<serde_json::Value>>,
    pub(crate) peer_authentications: Vec<Sourced<serde_json::Value>>,
    /// Untyped, as policies: Istio's types are not in k8s-openapi.
    pub(crate) service_entries: Vec<Sourced<serde_json::Value>>,
    /// The addresses the container runtime gave pods, by UID: a pod being created has them
    /// before the API server does.
    pub(crate) sandbox_addresses: HashMap<String, Vec<IpAddr>>,
}

/// An object that says something the model cannot hold, such as a pod IP that is no IP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field `{field}`: {message}")]
pub struct ObjectError {
    /// `document 3 (Pod shop/web)` or `Pod shop/web`.
    pub object: String,
    pub field: String,
    pub message: String,
}

/// The state the objects describe, with the objects that could not be translated (left out of
/// it) and the policies that did not compile (standing in as fail-closed).
#[derive(Debug)]
pub(crate) struct Translated {
    pub(crate) state: ClusterState,
    pub(crate) errors: Vec<ObjectError>,
}

/// `Kind namespace/name`, with the document it came from.
pub(crate) struct Describe<'a> {
    pub(crate) origin: Origin,
    pub(crate) kind: &'a str,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) name: Option<&'a str>,
}

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (namespace, name) = (self.namespace.unwrap_or("?"), self.name.unwrap_or("?"));
        match self.origin {
            Origin::Document(document) => {
                write!(f, "document {document} ({} {namespace}/{name})", self.kind)
            }
            Origin::Api => write!(f, "{} {namespace}/{name}", self.kind),
        }
    }
}

impl Objects {
    pub(crate) fn translate(&self, root_namespace: &str) -> Translated {
        let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = self
            .namespaces
            .iter()
            .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns.metadata.labels.as_ref()?)))
            .collect();
        let localities: HashMap<&str, Locality> = self
            .nodes
            .iter()
            .filter_map(|node| Some((node.metadata.name.as_deref()?, locality(node))))
            .collect();
        let waypoints = waypoints::Waypoints::new(&self.services);
        let mut errors = Vec::new();
        let mut workloads = Vec::new();
        for pod in &self.pods {
            let pod_context = PodContext {
                namespace_labels: &namespace_labels,
                localities: &localities,
                sandbox_addresses: &self.sandbox_addresses,
                waypoints: &waypoints,
            };
            match workload(pod, &pod_context) {
                Ok(Some(workload)) => workloads.push(workload),
                Ok(None) => {}
                Err(error) => errors.push(error),
            }
        }
        let mut endpoints: HashMap<(String, String), Vec<Endpoint>> = HashMap::new();
        for slice in &self.endpoint_slices {
            let labels = slice.metadata.labels.as_ref();
            let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
                continue;
            };
            endpoints
                .entry((namespace(&slice.metadata), service.clone()))
                .or_default()
                .extend(slice_endpoints(slice));
        }
        let mut services = Vec::new();
        for service in &self.services {
            match self::service(service, &mut endpoints, &namespace_labels, &waypoints) {
                Ok(service) => services.push(service),
                Err(error) => errors.push(error),
            }
        }
        let admitting_waypoints = waypoints::policies(&workloads, &services, root_namespace);
        let policies = policies::compile(
            &self.authorization_policies,
            &self.peer_authentications,
            root_namespace,
            admitting_waypoints,
        );
        let mut service_entries = Vec::new();
        for entry in &self.service_entries {
            match service_entries::service_entry(entry) {
                Ok(entry) => service_entries.push(entry),
                Err(error) => errors.push(error),
            }
        }
        let outbound_policies = outbound_policies(&namespace_labels, &mut errors);
        let state = ClusterState::new(workloads, services)
            .with_policies(
                policies.authorization,
                policies.peer_authentication,
                policies.rejected,
            )
            .with_egress(ServiceEntries::new(service_entries), outbound_policies);
        Translated { state, errors }
    }
}

/// The namespaces whose label sets an outbound traffic policy. A value that names none is
/// reported and taken as `REGISTRY_ONLY`: a typo must not open egress.
fn outbound_policies(
    namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
    errors: &mut Vec<ObjectError>,
) -> HashMap<String, OutboundTrafficPolicy> {
    let mut policies = HashMap::new();
    for (namespace, labels) in namespace_labels {
        let Some(value) = labels.get(OUTBOUND_POLICY_LABEL) else {
            continue;
        };
        let policy = OutboundTrafficPolicy::named(value).unwrap_or_else(|| {
            errors.push(ObjectError {
                object: format!("Namespace {namespace}"),
                field: format!("metadata.labels[{OUTBOUND_POLICY_LABEL}]"),
                message: format!(
                    "{value:?} is neither ALLOW_ANY nor REGISTRY_ONLY; enforcing REGISTRY_ONLY"
                ),
            });
            OutboundTrafficPolicy::RegistryOnly
        });
        policies.insert((*namespace).to_owned(), policy);
    }
    policies
}

fn namespace(metadata: &ObjectMeta) -> String {
    metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

/// Says what is wrong with one field of one object.
struct Fields {
    object: String,
}

impl Fields {
    fn of(origin: Origin, kind: &str, metadata: &ObjectMeta) -> Self {
        let object = Describe {
            origin,
            kind,
            namespace: metadata.namespace.as_deref(),
            name: metadata.name.as_deref(),
        };
        Self {
            object: object.to_string(),
        }
    }

    fn error(&self, field: &str, message: String) -> ObjectError {
        ObjectError {
            object: self.object.clone(),
            field: field.to_owned(),
            message,
        }
    }

    fn ip(&self, field: &str, value: &str) -> Result<IpAddr, ObjectError> {
        value
            .parse()
            .map_err(|_| self.error(field, format!("{value:?} is not an IP address")))
    }

    fn port(&self, field: &str, value: i32) -> Result<u16, ObjectError> {
        u16::try_from(value).map_err(|_| self.error(field, format!("{value} is not a port")))
    }
}

/// What a pod's workload is made with besides the pod.
struct PodContext<'a> {
    namespace_labels: &'a HashMap<&'a str, &'a BTreeMap<String, String>>,
    localities: &'a HashMap<&'a str, Locality>,
    sandbox_addresses: &'a HashMap<String, Vec<IpAddr>>,
    waypoints: &'a waypoints::Waypoints,
}

/// The workload of a scheduled pod with an IP; `None` for a pod not running yet.
fn workload(pod: &Sourced<Pod>, context: &PodContext<'_>) -> Result<Option<Workload>, ObjectError> {
    let PodContext {
        namespace_labels,
        localities,
        sandbox_addresses,
        waypoints,
    } = context;
    let Sourced {
        origin,
        object: pod,
    } = pod;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = namespace(&pod.metadata);
    let spec = pod.spec.as_ref();
    let no_status = PodStatus::default();
    let status = pod.status.as_ref().unwrap_or(&no_status);
    let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
        return Ok(None);
    };
    // A pod that has run to completion keeps its IP in the API, but the IP is free for reuse;
    // one on the host network has its node's IP, shared with every other such pod.
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    if host_network || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let mut ip_strings: Vec<(&str, &str)> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ("status.podIPs", ip.ip.as_str()))
        .collect();
    if ip_strings.is_empty() {
        ip_strings.extend(status.pod_ip.as_deref().map(|ip| ("status.podIP", ip)));
    }
    let fields = || Fields::of(*origin, "Pod", &pod.metadata);
    let mut ips = ip_strings
        .into_iter()
        .map(|(field, ip)| fields().ip(field, ip))
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty()
        && let Some(addresses) = pod
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| sandbox_addresses.get(uid))
    {
        ips.clone_from(addresses);
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    // The same rule as the CNI plugin's, which decides when the agent is not there.
    let no_labels = BTreeMap::new();
    let own_namespace_labels = namespace_labels.get(namespace.as_str()).copied();
    let in_mesh = ambit_cni::in_mesh(
        own_namespace_labels.unwrap_or(&no_labels),
        &labels,
        pod.metadata.annotations.as_ref().unwrap_or(&no_labels),
    );
    let protocol = if in_mesh {
        Protocol::Hbone
    } else {
        Protocol::Tcp
    };
    let waypoint = waypoints.of_pod(&namespace, &labels, own_namespace_labels);
    Ok(Some(Workload {
        waypoint,
        uid: WorkloadUid(
            pod.metadata
                .uid
                .clone()
                .unwrap_or_else(|| format!("{namespace}/{name}")),
        ),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        workload_name: workload_name(pod, &labels).unwrap_or_else(|| name.clone()),
        name,
        namespace,
        locality: localities.get(node.as_str()).cloned().unwrap_or_default(),
        node,
        ips,
        labels,
        protocol,
    }))
}

/// A node's region and zone, from its well-known topology labels.
fn locality(node: &Node) -> Locality {
    let label = |key: &str| {
        node.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(key))
            .filter(|value| !value.is_empty())
            .cloned()
    };
    Locality {
        region: label(REGION_LABEL),
        zone: label(ZONE_LABEL),
    }
}

/// The name of the pod's controller, as Istio derives it: a ReplicaSet's name without its
/// `pod-template-hash` suffix (its Deployment), any other controller's name as it is.
fn workload_name(pod: &Pod, labels: &BTreeMap<String, String>) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))?;
    let deployment = (owner.kind == "ReplicaSet")
        .then(|| labels.get("pod-template-hash"))
        .flatten()
        .and_then(|hash| owner.name.strip_suffix(hash.as_str()))
        .and_then(|name| name.strip_suffix('-'));
    Some(deployment.unwrap_or(&owner.name).to_owned())
}

fn slice_endpoints(slice: &EndpointSlice) -> Vec<Endpoint> {
    let ports: BTreeMap<String, u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    slice
        .endpoints
        .iter()
        .flat_map(|endpoint| {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let ports = ports.clone();
            let hostname = endpoint.hostname.clone();
            endpoint.addresses.iter().filter_map(move |address| {
                Some(Endpoint {
                    ip: address.parse().ok()?,
                    ready,
                    ports: ports.clone(),
                    hostname: hostname.clone(),
                })
            })
        })
        .collect()
}

fn service(
    service: &Sourced<K8sService>,
    endpoints: &mut HashMap<(String, String), Vec<Endpoint>>,
    namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
    waypoints: &waypoints::Waypoints,
) -> Result<Service, ObjectError> {
    let Sourced {
        origin,
        object: service,
    } = service;
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = namespace(&service.metadata);
    let fields = Fields::of(*origin, "Service", &service.metadata);
    let spec = service.spec.as_ref();
    let cluster_ips: Vec<&String> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec
            .and_then(|s| s.cluster_ip.as_ref())
            .into_iter()
            .collect(),
    };
    let vips = cluster_ips
        .into_iter()
        .filter(|ip| *ip != "None" && !ip.is_empty())
        .map(|ip| fields.ip("spec.clusterIP", ip))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for (index, port) in spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let number = fields.port(&format!("spec.ports[{index}].port"), port.port)?;
        let target = match &port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(target)) => TargetPort::Number(
                fields.port(&format!("spec.ports[{index}].targetPort"), *target)?,
            ),
            Some(IntOrString::String(name)) => TargetPort::Named(name.clone()),
        };
        ports.push(ServicePort {
            protocol: AppProtocol::of(port.app_protocol.as_deref(), port.name.as_deref()),
            name: port.name.clone(),
            port: number,
            target,
        });
    }
    let no_labels = BTreeMap::new();
    let labels = service.metadata.labels.as_ref().unwrap_or(&no_labels);
    let waypoint = waypoints.of_service(
        &namespace,
        &name,
        labels,
        namespace_labels.get(namespace.as_str()).copied(),
    );
    Ok(Service {
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        waypoint,
        is_waypoint: waypoints.is_waypoint(&namespace, &name),
        endpoints: endpoints
            .remove(&(namespace.clone(), name.clone()))
            .unwrap_or_default(),
        name,
        namespace,
        vips,
        ports,
    })
}
