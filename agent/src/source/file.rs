//! The file source: ordinary Kubernetes objects in one multi-document YAML file, reloaded when
//! the file changes. A file that fails to parse is reported, document and field, and the last
//! good state stays in force.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use tokio::sync::watch;

use crate::drain::DrainWatcher;
use crate::error_chain::ErrorChain;
use crate::state::{
    ClusterState, Endpoint, Protocol, Service, ServicePort, TargetPort, Workload, WorkloadUid,
};

/// How often the file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The label that enrols a namespace (`ambient`) or opts a pod out (`none`).
pub(crate) const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why the file could not be turned into a cluster state.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("document {document}: not valid YAML")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {document} ({object}): field `{field}`: {message}")]
    Field {
        document: usize,
        object: String,
        field: String,
        message: String,
    },
}

/// Reads cluster objects from a YAML file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    root_namespace: String,
}

impl FileSource {
    /// The file at `path`; policies in `root_namespace` apply to the whole mesh.
    pub fn new(path: impl Into<PathBuf>, root_namespace: &str) -> Self {
        Self {
            path: path.into(),
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// Reads and parses the file once.
    pub fn load(&self) -> Result<ClusterState, SourceError> {
        let text = read(&self.path)?;
        self.parse(&text)
    }

    /// Parses `text`, reporting the policies that were rejected (they stand in as fail-closed).
    fn parse(&self, text: &str) -> Result<ClusterState, SourceError> {
        let state = parse(text, &self.root_namespace)?;
        for rejected in state.rejected_policies() {
            tracing::error!(path = %self.path.display(), error = rejected, "policy rejected: enforcing it as fail-closed");
        }
        Ok(state)
    }

    /// Publishes a new state into `states` whenever the file changes and still parses, until a
    /// drain starts.
    pub async fn watch(self, states: watch::Sender<Arc<ClusterState>>, mut drain: DrainWatcher) {
        let mut last = read(&self.path).ok();
        loop {
            tokio::select! {
                () = drain.signaled() => return,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let text = match read(&self.path) {
                Ok(text) => text,
                Err(error) => {
                    tracing::warn!(
                        error = %ErrorChain(&error),
                        "keeping the last good state"
                    );
                    continue;
                }
            };
            if last.as_ref() == Some(&text) {
                continue;
            }
            // Parsing and compiling a large file takes a while: off the proxies' threads.
            let (source, parsing) = (self.clone(), text.clone());
            let parsed = tokio::task::spawn_blocking(move || source.parse(&parsing))
                .await
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
            match parsed {
                Ok(state) => {
                    tracing::info!(path = %self.path.display(), workloads = state.workloads().len(), "configuration reloaded");
                    states.send_replace(Arc::new(state));
                }
                Err(error) => tracing::error!(
                    path = %self.path.display(),
                    error = %ErrorChain(&error),
                    "configuration rejected, keeping the last good state"
                ),
            }
            last = Some(text);
        }
    }
}

fn read(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path).map_err(|e| SourceError::Read(path.to_owned(), e))
}

/// The objects of one file, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    pods: Vec<(usize, Pod)>,
    services: Vec<(usize, K8sService)>,
    endpoint_slices: Vec<EndpointSlice>,
    /// Kept untyped: a policy that does not parse is replaced, not fatal to the file.
    policies: Vec<(usize, String, serde_yaml_ng::Value)>,
}

pub(crate) fn parse(text: &str, root_namespace: &str) -> Result<ClusterState, SourceError> {
    let mut objects = Objects::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        let value =
            serde_yaml_ng::Value::deserialize(document).map_err(|source| SourceError::Yaml {
                document: document_number,
                source,
            })?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        let object = describe(&value);
        let n = document_number;
        match kind {
            "Namespace" => objects.namespaces.push(typed(n, &object, value)?),
            "Pod" => objects.pods.push((n, typed(n, &object, value)?)),
            "Service" => objects.services.push((n, typed(n, &object, value)?)),
            "EndpointSlice" => objects.endpoint_slices.push(typed(n, &object, value)?),
            "AuthorizationPolicy" | "PeerAuthentication" => {
                objects.policies.push((n, object, value));
            }
            "" => {
                return Err(SourceError::Field {
                    document: document_number,
                    object,
                    field: "kind".into(),
                    message: "missing".into(),
                });
            }
            other => tracing::debug!(kind = other, document = document_number, "ignoring object"),
        }
    }
    objects.into_state(root_namespace)
}

fn typed<T: for<'de> Deserialize<'de>>(
    document: usize,
    object: &str,
    value: serde_yaml_ng::Value,
) -> Result<T, SourceError> {
    serde_path_to_error::deserialize(value).map_err(|error| SourceError::Field {
        document,
        object: object.to_owned(),
        field: error.path().to_string(),
        message: error.into_inner().to_string(),
    })
}

/// `Kind namespace/name`, as far as the document says.
fn describe(value: &serde_yaml_ng::Value) -> String {
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(value, |v, key| v.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "{} {}/{}",
        field(&["kind"]),
        field(&["metadata", "namespace"]),
        field(&["metadata", "name"])
    )
}

impl Objects {
    fn into_state(self, root_namespace: &str) -> Result<ClusterState, SourceError> {
        let ambient: HashMap<&str, bool> = self
            .namespaces
            .iter()
            .filter_map(|ns| {
                let labels = ns.metadata.labels.as_ref();
                let enrolled = labels
                    .and_then(|l| l.get(DATAPLANE_MODE))
                    .is_some_and(|mode| mode == "ambient");
                Some((ns.metadata.name.as_deref()?, enrolled))
            })
            .collect();
        let mut workloads = Vec::new();
        for (document, pod) in &self.pods {
            if let Some(workload) = workload(*document, pod, &ambient)? {
                workloads.push(workload);
            }
        }
        let mut endpoints: HashMap<(String, String), Vec<Endpoint>> = HashMap::new();
        for slice in &self.endpoint_slices {
            let labels = slice.metadata.labels.as_ref();
            let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
                continue;
            };
            let namespace = namespace(&slice.metadata.namespace);
            endpoints
                .entry((namespace, service.clone()))
                .or_default()
                .extend(slice_endpoints(slice));
        }
        let mut services = Vec::new();
        for (document, service) in &self.services {
            services.push(self::service(*document, service, &mut endpoints)?);
        }
        let policies = policies::compile(self.policies, root_namespace);
        Ok(ClusterState::new(workloads, services).with_policies(
            policies.authorization,
            policies.peer_authentication,
            policies.rejected,
        ))
    }
}

fn namespace(namespace: &Option<String>) -> String {
    namespace.clone().unwrap_or_else(|| "default".to_owned())
}

/// Where an object stands in the file, for saying what is wrong with it.
struct Origin {
    document: usize,
    object: String,
}

impl Origin {
    fn error(&self, field: &str, message: String) -> SourceError {
        SourceError::Field {
            document: self.document,
            object: self.object.clone(),
            field: field.to_owned(),
            message,
        }
    }

    fn ip(&self, field: &str, value: &str) -> Result<IpAddr, SourceError> {
        value
            .parse()
            .map_err(|_| self.error(field, format!("{value:?} is not an IP address")))
    }

    fn port(&self, field: &str, value: i32) -> Result<u16, SourceError> {
        u16::try_from(value).map_err(|_| self.error(field, format!("{value} is not a port")))
    }
}

/// The workload of a scheduled pod with an IP; `None` for a pod not running yet.
fn workload(
    document: usize,
    pod: &Pod,
    ambient: &HashMap<&str, bool>,
) -> Result<Option<Workload>, SourceError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = namespace(&pod.metadata.namespace);
    let origin = Origin {
        document,
        object: format!("Pod {namespace}/{name}"),
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let (Some(node), Some(status)) = (spec.and_then(|s| s.node_name.clone()), status) else {
        return Ok(None);
    };
    let mut ip_strings: Vec<(&str, &str)> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ("status.podIPs", ip.ip.as_str()))
        .collect();
    if ip_strings.is_empty() {
        ip_strings.extend(status.pod_ip.as_deref().map(|ip| ("status.podIP", ip)));
    }
    let ips = ip_strings
        .into_iter()
        .map(|(field, ip)| origin.ip(field, ip))
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() {
        return Ok(None);
    }
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let opted_out = labels
        .get(DATAPLANE_MODE)
        .is_some_and(|mode| mode == "none");
    let in_mesh = ambient.get(namespace.as_str()).copied().unwrap_or(false);
    let protocol = if in_mesh && !opted_out && !host_network {
        Protocol::Hbone
    } else {
        Protocol::Tcp
    };
    Ok(Some(Workload {
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
        node,
        ips,
        labels,
        protocol,
    }))
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
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.port?).ok()?)))
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
            endpoint.addresses.iter().filter_map(move |address| {
                Some(Endpoint {
                    ip: address.parse().ok()?,
                    ready,
                    ports: ports.clone(),
                })
            })
        })
        .collect()
}

fn service(
    document: usize,
    service: &K8sService,
    endpoints: &mut HashMap<(String, String), Vec<Endpoint>>,
) -> Result<Service, SourceError> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = namespace(&service.metadata.namespace);
    let origin = Origin {
        document,
        object: format!("Service {namespace}/{name}"),
    };
    let spec = service.spec.clone().unwrap_or_default();
    let cluster_ips = match spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips,
        _ => spec.cluster_ip.into_iter().collect(),
    };
    let vips = cluster_ips
        .iter()
        .filter(|ip| *ip != "None" && !ip.is_empty())
        .map(|ip| origin.ip("spec.clusterIP", ip))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let number = origin.port(&format!("spec.ports[{index}].port"), port.port)?;
        let target = match &port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(target)) => TargetPort::Number(
                origin.port(&format!("spec.ports[{index}].targetPort"), *target)?,
            ),
            Some(IntOrString::String(name)) => TargetPort::Named(name.clone()),
        };
        ports.push(ServicePort {
            name: port.name.clone(),
            port: number,
            target,
        });
    }
    Ok(Service {
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        endpoints: endpoints
            .remove(&(namespace.clone(), name.clone()))
            .unwrap_or_default(),
        name,
        namespace,
        vips,
        ports,
    })
}

mod policies;
#[cfg(test)]
mod tests;
