//! Pods whose sandbox the container runtime is creating before the watch has brought them:
//! fetched from the API server, so that the CNI plugin's ADD does not wait on a slow watch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::trim;
use crate::error_chain::ErrorChain;
use crate::sandboxes::Sandboxes;
use crate::state::WorkloadUid;

/// The pods fetched, and those asked for.
pub(super) struct UnseenPods {
    client: Client,
    fetched: HashMap<WorkloadUid, Arc<Pod>>,
    asked: HashSet<WorkloadUid>,
    arrivals: mpsc::UnboundedSender<Arc<Pod>>,
    arrived: mpsc::UnboundedReceiver<Arc<Pod>>,
}

impl UnseenPods {
    pub(super) fn new(client: Client) -> Self {
        let (arrivals, arrived) = mpsc::unbounded_channel();
        Self {
            client,
            fetched: HashMap::new(),
            asked: HashSet::new(),
            arrivals,
            arrived,
        }
    }

    /// Asks the API server, once, for each pod with a sandbox that `pods` lacks; forgets the
    /// pods `pods` has now, and those whose sandbox is gone. (At most one request in flight per
    /// live sandbox.)
    pub(super) fn ask(&mut self, sandboxes: &Sandboxes, pods: &Store<Pod>) {
        let live = sandboxes.live();
        let in_store = |uid: &WorkloadUid, namespace: &str, name: &str| {
            pods.get(&ObjectRef::new(name).within(namespace))
                .is_some_and(|pod| pod.metadata.uid.as_deref() == Some(uid.0.as_str()))
        };
        let unseen: HashSet<&WorkloadUid> = live
            .iter()
            .filter(|(uid, sandbox)| !in_store(uid, &sandbox.namespace, &sandbox.name))
            .map(|(uid, _)| uid)
            .collect();
        self.fetched.retain(|uid, _| unseen.contains(uid));
        self.asked.retain(|uid| unseen.contains(uid));
        for (uid, sandbox) in &live {
            if !unseen.contains(uid) || !self.asked.insert(uid.clone()) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &sandbox.namespace);
            let (uid, name, arrivals) = (uid.clone(), sandbox.name.clone(), self.arrivals.clone());
            tokio::spawn(async move {
                match api.get_opt(&name).await {
                    Ok(Some(mut pod)) if pod.metadata.uid.as_deref() == Some(uid.0.as_str()) => {
                        trim::pod(&mut pod);
                        let _ = arrivals.send(Arc::new(pod));
                    }
                    Ok(_) => tracing::debug!(pod = name, "the API server has no such pod yet"),
                    Err(error) => tracing::warn!(
                        pod = name,
                        error = %ErrorChain(&error),
                        "failed to fetch a pod the watch has not brought yet"
                    ),
                }
            });
        }
    }

    /// The next pod fetched.
    pub(super) async fn arrival(&mut self) -> Option<Arc<Pod>> {
        self.arrived.recv().await
    }

    /// Keeps a fetched pod, if it is still wanted.
    pub(super) fn keep(&mut self, pod: Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone().map(WorkloadUid) else {
            return;
        };
        if self.asked.contains(&uid) {
            self.fetched.insert(uid, pod);
        }
    }

    /// The pods fetched and not brought by the watch yet.
    pub(super) fn pods(&self) -> impl Iterator<Item = Arc<Pod>> + '_ {
        self.fetched.values().cloned()
    }
}
