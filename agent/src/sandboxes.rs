//! Pod sandboxes as the container runtime reported them through the CNI plugin: the network
//! namespace and addresses of a pod whose containers have not started yet, known before the API
//! server has the pod's IP. The CNI server fills it; the source gives such pods these
//! addresses; enrolment captures them in that namespace, with no search.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ambit_redirect::NetnsId;
use tokio::sync::watch;

use crate::state::WorkloadUid;

/// Where the runtime put one pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sandbox {
    /// The pod's namespace and name, as the runtime gave them.
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) netns: PathBuf,
    pub(crate) ips: Vec<IpAddr>,
}

/// The node's sandboxes, shared; cloning shares them.
#[derive(Debug, Clone)]
pub(crate) struct Sandboxes {
    known: Arc<Mutex<Known>>,
    /// Changes with every sandbox created or torn down.
    changed: watch::Sender<()>,
    /// Changes with every pod captured or released.
    captures: watch::Sender<()>,
}

#[derive(Debug, Default)]
struct Known {
    live: HashMap<WorkloadUid, Sandbox>,
    /// Pods whose sandbox the runtime has torn down: released, and not enrolled again until
    /// the runtime makes them a new one.
    torn_down: HashSet<WorkloadUid>,
    /// The namespace each enrolled pod is captured in.
    captured: HashMap<WorkloadUid, NetnsId>,
}

impl Default for Sandboxes {
    fn default() -> Self {
        Self {
            known: Arc::default(),
            changed: watch::Sender::new(()),
            captures: watch::Sender::new(()),
        }
    }
}

impl Sandboxes {
    pub(crate) fn created(&self, uid: WorkloadUid, sandbox: Sandbox) {
        let mut known = self.known();
        known.torn_down.remove(&uid);
        known.live.insert(uid, sandbox);
        drop(known);
        self.changed.send_replace(());
    }

    pub(crate) fn torn_down(&self, uid: &WorkloadUid) {
        let mut known = self.known();
        known.live.remove(uid);
        known.torn_down.insert(uid.clone());
        drop(known);
        self.changed.send_replace(());
    }

    pub(crate) fn get(&self, uid: &WorkloadUid) -> Option<Sandbox> {
        self.known().live.get(uid).cloned()
    }

    /// Every live sandbox, by pod.
    pub(crate) fn live(&self) -> Vec<(WorkloadUid, Sandbox)> {
        let known = self.known();
        let live = known.live.iter();
        live.map(|(uid, sandbox)| (uid.clone(), sandbox.clone()))
            .collect()
    }

    /// The pods whose sandbox the runtime tore down, still kept from enrolment.
    pub(crate) fn torn_down_pods(&self) -> Vec<WorkloadUid> {
        self.known().torn_down.iter().cloned().collect()
    }

    pub(crate) fn is_torn_down(&self, uid: &WorkloadUid) -> bool {
        self.known().torn_down.contains(uid)
    }

    /// The runtime's addresses of each pod, by UID.
    pub(crate) fn addresses(&self) -> HashMap<String, Vec<IpAddr>> {
        self.known()
            .live
            .iter()
            .map(|(uid, sandbox)| (uid.0.clone(), sandbox.ips.clone()))
            .collect()
    }

    /// Forgets the torn-down pods that `listed` says the cluster state no longer has: nothing
    /// is left to keep from enrolment. (Live sandboxes go with their runtime's DEL.)
    pub(crate) fn forget_torn_down(&self, listed: impl Fn(&WorkloadUid) -> bool) {
        self.known().torn_down.retain(|uid| listed(uid));
    }

    /// Changes with every sandbox created or torn down.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Records that the pod is captured in `netns`.
    pub(crate) fn captured(&self, uid: &WorkloadUid, netns: NetnsId) {
        self.known().captured.insert(uid.clone(), netns);
        self.captures.send_replace(());
    }

    /// Records that the pod's capture in `netns` is gone (it may be captured elsewhere now).
    pub(crate) fn released(&self, uid: &WorkloadUid, netns: NetnsId) {
        let mut known = self.known();
        if known.captured.get(uid) == Some(&netns) {
            known.captured.remove(uid);
        }
        drop(known);
        self.captures.send_replace(());
    }

    /// The namespace the pod is captured in, if it is.
    pub(crate) fn captured_in(&self, uid: &WorkloadUid) -> Option<NetnsId> {
        self.known().captured.get(uid).copied()
    }

    /// Changes with every pod captured or released.
    pub(crate) fn subscribe_captures(&self) -> watch::Receiver<()> {
        self.captures.subscribe()
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
