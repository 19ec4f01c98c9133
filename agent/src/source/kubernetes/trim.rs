//! Objects cut down to what the model reads, before they are stored: the source keeps every pod
//! of the cluster, and most of a pod (its containers, conditions, managed fields) is never read.
//! Resource versions go too, so that an update the model cannot see (a pod's readiness, a new
//! container status) leaves the stored object equal, and nothing is recomputed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;

use super::status::REDIRECTION_ANNOTATION;
use crate::source::translate::TOPOLOGY_LABELS;
use ambit_cni::SIDECAR_STATUS_ANNOTATION;

/// Where `kubectl apply` keeps a copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

pub(super) fn namespace(namespace: &mut Namespace) {
    let metadata = std::mem::take(&mut namespace.metadata);
    *namespace = Namespace {
        metadata: ObjectMeta {
            name: metadata.name,
            labels: metadata.labels,
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
}

/// A node's name and topology labels, all the model reads: its status, which the kubelet
/// updates every few seconds, and its other labels then change nothing.
pub(super) fn node(node: &mut Node) {
    let metadata = std::mem::take(&mut node.metadata);
    let labels = metadata.labels.map(|labels| {
        labels
            .into_iter()
            .filter(|(key, _)| TOPOLOGY_LABELS.contains(&key.as_str()))
            .collect()
    });
    *node = Node {
        metadata: ObjectMeta {
            name: metadata.name,
            labels,
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
}

pub(super) fn pod(pod: &mut Pod) {
    let metadata = std::mem::take(&mut pod.metadata);
    let spec = pod.spec.take().unwrap_or_default();
    let status = pod.status.take().unwrap_or_default();
    // The annotations read: whether the agent has marked the pod captured, and whether it has
    // a sidecar (only whether, so not the sidecar's whole description).
    let annotations = metadata.annotations.map(|mut annotations| {
        let redirection = annotations.remove_entry(REDIRECTION_ANNOTATION);
        let sidecar = annotations
            .remove_entry(SIDECAR_STATUS_ANNOTATION)
            .map(|(key, _)| (key, String::new()));
        redirection
            .into_iter()
            .chain(sidecar)
            .collect::<BTreeMap<_, _>>()
    });
    let annotations = annotations.filter(|a| !a.is_empty());
    *pod = Pod {
        metadata: ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid,
            labels: metadata.labels,
            annotations,
            owner_references: metadata.owner_references,
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        }),
    };
}

pub(super) fn service(service: &mut Service) {
    strip(&mut service.metadata);
    service.status = None;
}

pub(super) fn endpoint_slice(slice: &mut EndpointSlice) {
    strip(&mut slice.metadata);
}

pub(super) fn policy(policy: &mut DynamicObject) {
    strip(&mut policy.metadata);
    // The status is Istio's, and unread.
    if let Some(data) = policy.data.as_object_mut() {
        data.remove("status");
    }
}

/// Drops the bookkeeping of the API server and of `kubectl`, which the model never reads.
fn strip(metadata: &mut ObjectMeta) {
    metadata.managed_fields = None;
    metadata.resource_version = None;
    metadata.generation = None;
    if let Some(annotations) = &mut metadata.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::translate::{Objects, Origin, Sourced};

    #[test]
    fn a_trimmed_node_keeps_its_name_and_topology_only() {
        let mut trimmed: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "node1", "resourceVersion": "42",
                "labels": {
                    "kubernetes.io/hostname": "node1",
                    "topology.kubernetes.io/region": "eu-west-1",
                    "topology.kubernetes.io/zone": "eu-west-1a",
                },
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        node(&mut trimmed);
        let expected: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "node1",
                "labels": {
                    "topology.kubernetes.io/region": "eu-west-1",
                    "topology.kubernetes.io/zone": "eu-west-1a",
                },
            },
        }))
        .unwrap();
        assert_eq!(trimmed, expected);
    }

    #[test]
    fn a_trimmed_pod_translates_as_the_whole_pod() {
        let whole: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-5d9c7-abcde", "namespace": "shop", "uid": "0b5f",
                "labels": {"app": "web", "pod-template-hash": "5d9c7"},
                "annotations": {REDIRECTION_ANNOTATION: "enabled", LAST_APPLIED: "{}", "other": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c7", "uid": "1", "controller": true}],
                "managedFields": [{"manager": "kubelet"}],
                "resourceVersion": "42",
            },
            "spec": {"nodeName": "node1", "serviceAccountName": "web",
                     "containers": [{"name": "app", "image": "web", "env": [{"name": "A", "value": "B"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let mut trimmed = whole.clone();
        pod(&mut trimmed);
        assert_eq!(
            trimmed.metadata.annotations,
            Some(BTreeMap::from([(
                REDIRECTION_ANNOTATION.to_owned(),
                "enabled".to_owned()
            )]))
        );
        assert!(trimmed.spec.as_ref().unwrap().containers.is_empty());
        let translate = |pod: Pod| {
            let objects = Objects {
                pods: vec![Sourced {
                    origin: Origin::Api,
                    object: Arc::new(pod),
                }],
                ..Objects::default()
            };
            let state = objects.translate("istio-system").state;
            state.workloads().into_iter().cloned().collect::<Vec<_>>()
        };
        assert_eq!(translate(whole), translate(trimmed));
    }
}
