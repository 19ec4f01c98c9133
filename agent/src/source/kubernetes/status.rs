//! What the agent did with the node's pods, written back to them: the annotation
//! `ambient.istio.io/redirection: enabled` on a captured pod (as istio-cni sets it), removed
//! when the pod is released, and a Warning Event on a pod that cannot be captured.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::watch;

use crate::drain::DrainWatcher;
use crate::enrolment::{Capture, CaptureStatus};
use crate::error_chain::ErrorChain;
use crate::state::{ClusterState, WorkloadUid};

pub(super) const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// How often writes that failed are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Writes the node's capture status to its pods.
pub(super) struct Writer {
    client: Client,
    node: String,
    recorder: Recorder,
    /// The problem last reported on each pod, so that each is reported once.
    reported: HashMap<WorkloadUid, String>,
}

impl Writer {
    pub(super) fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "ambit".to_owned(),
            instance: Some(node.to_owned()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node: node.to_owned(),
            reported: HashMap::new(),
        }
    }

    /// Keeps the pods in line with `capture` and the state, until a drain starts.
    pub(super) async fn run(
        mut self,
        pods: kube::runtime::reflector::Store<Pod>,
        mut states: watch::Receiver<Arc<ClusterState>>,
        mut capture: watch::Receiver<CaptureStatus>,
        mut drain: DrainWatcher,
    ) {
        // Before the source's first state, every pod would look released.
        tokio::select! {
            () = drain.signaled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
        loop {
            tokio::select! {
                () = drain.signaled() => return,
                changed = states.changed() => if changed.is_err() { return },
                changed = capture.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY_INTERVAL) => {}
            }
            let state = states.borrow_and_update().clone();
            let capture = capture.borrow_and_update().clone();
            self.write(&pods, &state, &capture).await;
        }
    }

    async fn write(
        &mut self,
        pods: &kube::runtime::reflector::Store<Pod>,
        state: &ClusterState,
        capture: &CaptureStatus,
    ) {
        let enrolled: HashSet<&WorkloadUid> = state
            .enrolled_on(&self.node)
            .into_iter()
            .map(|w| &w.uid)
            .collect();
        let on_node = pods.state().into_iter().filter(|pod| {
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str())
        });
        for pod in on_node {
            let Some(uid) = pod.metadata.uid.clone().map(WorkloadUid) else {
                continue;
            };
            let annotated = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|value| value == "enabled");
            // A pod still being enrolled is left as it is: an agent that just started does not
            // take the annotation off a pod its predecessor captured.
            let annotate = match (enrolled.contains(&uid), capture.get(&uid)) {
                (false, _) => Some(false),
                (true, Some(Capture::Captured(_))) => Some(true),
                (true, _) => None,
            };
            if let Some(annotate) = annotate.filter(|a| *a != annotated) {
                self.annotate(&pod, &uid, annotate).await;
            }
            if let Some(Capture::Refused(why) | Capture::Failed(why)) = capture.get(&uid)
                && self.reported.get(&uid) != Some(why)
            {
                self.report(&pod, capture.get(&uid), why).await;
                self.reported.insert(uid, why.clone());
            }
        }
        self.reported.retain(|uid, _| capture.contains_key(uid));
    }

    /// Sets or removes the annotation. The patch names the pod's UID, so that it cannot land on
    /// another pod that took the name meanwhile.
    async fn annotate(&self, pod: &Pod, uid: &WorkloadUid, enabled: bool) {
        let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            return;
        };
        let value = enabled.then_some("enabled");
        let patch = serde_json::json!({
            "metadata": {"uid": uid.0, "annotations": {REDIRECTION_ANNOTATION: value}}
        });
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match api
            .patch(name, &PatchParams::apply("ambit"), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %format!("{namespace}/{name}"), enabled, "redirection annotation written")
            }
            Err(error) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %ErrorChain(&error), "failed to write the redirection annotation; trying again")
            }
        }
    }

    async fn report(&self, pod: &Pod, capture: Option<&Capture>, why: &str) {
        let reason = match capture {
            Some(Capture::Refused(_)) => "CaptureRefused",
            _ => "CaptureFailed",
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note(why)),
            action: "Capture".to_owned(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %ErrorChain(&error), "failed to publish an event");
        }
    }
}

/// An Event's note: at most 1 KiB, the API server's limit, cut at a character boundary.
fn note(why: &str) -> String {
    const LIMIT: usize = 1024;
    let mut end = why.len().min(LIMIT);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].to_owned()
}
