//! Keeps the node's enrolled pods captured: for each one, the agent's sockets and proxies run
//! inside its namespace and its traffic is captured; when it leaves, both are removed.
//!
//! A pod is captured from its enrolment until it leaves the mesh, without a gap: changes to its
//! labels or service account reach the proxies through the state, and a new address is captured
//! before the old capture goes. On shutdown the proxies stop accepting and drain, but capture
//! stays: until the next agent starts, captured traffic fails closed rather than bypassing the
//! mesh.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_identity::{CertificateManager, Identity, IdentityError, TrustDomain};
use ambit_redirect::{
    CaptureBackend, CaptureError, CaptureTarget, HostProc, Netns, NetnsError, PodNetns,
    PodNetnsError, PodProcesses,
};
use futures_util::{StreamExt, stream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::Admission;
use crate::balance::Balancer;
use crate::dns::NodeDns;
use crate::drain::{self, DrainTrigger, DrainWatcher};
use crate::egress::OutboundTrafficPolicy;
use crate::error_chain::ErrorChain;
use crate::handover::{HandedPods, OfferRequest, OfferedPod, Replaced};
use crate::hbone::HboneClient;
use crate::proxy::{self, Pod, ProxyError};
use crate::readiness::Readiness;
use crate::revocation::Revocations;
use crate::sandboxes::Sandboxes;
use crate::sockets::PodSockets;
use crate::state::{ClusterState, LocalWorkload, Protocol, Workload, WorkloadUid};
use crate::telemetry::Telemetry;

/// How soon a pod that could not be enrolled is tried again.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// How long a successor waits for every pod to be captured before it takes over anyway: a pod
/// that cannot be captured must not keep the predecessor running.
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(30);

/// Pods enrolled at once: enough to keep the blocking threads (finding namespaces, loading
/// programs, netlink) busy while the runtime's workers start the pods' proxies.
const CONCURRENT_ENROLMENTS: usize = 16;

/// Why one pod could not be enrolled (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("the pod has no IP")]
    NoIp,
    #[error("no network namespace holds the pod's IP")]
    NetnsNotFound,
    #[error("failed to find the pod's network namespace")]
    FindNetns(#[source] NetnsError),
    #[error("no process of the pod runs yet")]
    NoProcess,
    #[error("refusing to guess the pod's network namespace")]
    Refused(#[source] PodNetnsError),
    #[error("failed to look for the pod's processes")]
    FindProcess(#[source] PodNetnsError),
    #[error("failed to enter the pod's network namespace")]
    EnterNetns(#[source] NetnsError),
    #[error("the pod's service account is not a valid identity")]
    Identity(#[source] IdentityError),
    #[error("failed to start the pod's proxies")]
    Proxy(#[source] ProxyError),
    #[error("failed to capture the pod's traffic")]
    Capture(#[source] CaptureError),
}

impl EnrolError {
    /// Why the search for the pod's processes' namespace failed.
    fn from_search(error: PodNetnsError) -> Self {
        match error {
            PodNetnsError::NoProcess => Self::NoProcess,
            PodNetnsError::NoAddress => Self::NoIp,
            PodNetnsError::Ambiguous { .. }
            | PodNetnsError::HostNamespace(_)
            | PodNetnsError::AddressMismatch { .. } => Self::Refused(error),
            error => Self::FindProcess(error),
        }
    }

    /// The step that failed, as `ambit_capture_failures_total` labels it; `None` for a pod
    /// that is still starting (no IP or no namespace yet).
    fn stage(&self) -> Option<&'static str> {
        match self {
            Self::NoIp | Self::NetnsNotFound | Self::NoProcess => None,
            Self::FindNetns(_) | Self::EnterNetns(_) | Self::Refused(_) | Self::FindProcess(_) => {
                Some("netns")
            }
            Self::Identity(_) => Some("identity"),
            Self::Proxy(_) => Some("proxy"),
            Self::Capture(_) => Some("capture"),
        }
    }

    /// Where the pod stands when enrolling it failed with this error.
    fn capture(&self) -> Capture {
        let error = ErrorChain(self).to_string();
        match self {
            Self::Refused(_) => Capture::Refused(error),
            _ if self.stage().is_some() => Capture::Failed(error),
            _ => Capture::Pending(error),
        }
    }
}

/// How a pod's network namespace was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FoundBy {
    /// The CNI plugin reported the sandbox the runtime made.
    Plugin,
    /// The agent looked for it: by the pod's processes in a cluster, by its address in the lab.
    Search,
}

/// Where each of the node's enrolled pods stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Capture {
    Captured(FoundBy),
    /// Not captured yet: the pod is still starting (no IP, no process).
    Pending(String),
    /// Not captured: a step failed, with the error of the latest attempt.
    Failed(String),
    /// Not captured: what the node shows contradicts what the cluster says of the pod (several
    /// namespaces claim it, or its namespace lacks its IP); never guessed, tried again.
    Refused(String),
}

/// How a pod's network namespace is found.
#[derive(Debug, Clone)]
pub(crate) enum Discovery {
    /// The namespace that holds the pod's IP: for the file source's lab, whose pods have no
    /// processes. Any namespace can claim any IP, so a cluster never uses it.
    ByAddress(PassListing<HashMap<IpAddr, Netns>>),
    /// The namespace the container runtime gave the CNI plugin for the pod's sandbox; else that
    /// of the pod's processes, found by the pod's UID in their cgroups and confirmed by its IPs.
    InCluster {
        sandboxes: Sandboxes,
        host_proc: HostProc,
        processes: PassListing<PodProcesses>,
    },
}

/// What the node's namespaces look like, listed once per enrolment pass (when a pod of the pass
/// first needs it) rather than once per pod, and forgotten at the pass's end.
#[derive(Debug)]
pub(crate) struct PassListing<T>(Arc<Mutex<Option<T>>>);

impl<T> Default for PassListing<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T> Clone for PassListing<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> PassListing<T> {
    /// Looks `find` up in this pass's listing, listing first if no pod of the pass did.
    fn find<R>(
        &self,
        list: impl FnOnce() -> Result<T, EnrolError>,
        find: impl FnOnce(&T) -> Result<R, EnrolError>,
    ) -> Result<R, EnrolError> {
        let mut listed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let listing = match &mut *listed {
            Some(listing) => listing,
            None => listed.insert(list()?),
        };
        find(listing)
    }

    /// Forgets the listing, and lets go of the namespaces it holds.
    fn forget(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Discovery {
    /// The pod's sandbox as the runtime gave it, if it did and it is still there.
    fn sandbox(&self, uid: &WorkloadUid) -> Option<Netns> {
        let Self::InCluster { sandboxes, .. } = self else {
            return None;
        };
        Netns::open(&sandboxes.get(uid)?.netns).ok()
    }

    /// The sandboxes the CNI plugin reported, when pods are found in a cluster.
    pub(crate) fn sandboxes(&self) -> Option<&Sandboxes> {
        match self {
            Self::InCluster { sandboxes, .. } => Some(sandboxes),
            Self::ByAddress(_) => None,
        }
    }

    /// Forgets what the node's namespaces looked like during an enrolment pass, at its end.
    fn end_pass(&self) {
        match self {
            Self::ByAddress(namespaces) => namespaces.forget(),
            Self::InCluster { processes, .. } => processes.forget(),
        }
    }

    async fn find(&self, workload: &Workload) -> Result<(Netns, FoundBy), EnrolError> {
        let (discovery, uid, ips) = (self.clone(), workload.uid.clone(), workload.ips.clone());
        tokio::task::spawn_blocking(move || discovery.find_blocking(&uid, &ips))
            .await
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
    }

    fn find_blocking(
        &self,
        uid: &WorkloadUid,
        ips: &[IpAddr],
    ) -> Result<(Netns, FoundBy), EnrolError> {
        match self {
            Self::ByAddress(namespaces) => {
                let ip = *ips.first().ok_or(EnrolError::NoIp)?;
                let netns = namespaces.find(
                    || Netns::by_address().map_err(EnrolError::FindNetns),
                    |namespaces| {
                        let netns = namespaces.get(&ip).ok_or(EnrolError::NetnsNotFound)?;
                        netns.try_clone().map_err(EnrolError::FindNetns)
                    },
                )?;
                Ok((netns, FoundBy::Search))
            }
            Self::InCluster {
                sandboxes,
                host_proc,
                processes,
            } => {
                if let Some(sandbox) = sandboxes.get(uid) {
                    let netns = Netns::open(&sandbox.netns).map_err(EnrolError::EnterNetns)?;
                    return Ok((netns, FoundBy::Plugin));
                }
                let netns = processes.find(
                    || host_proc.scan().map_err(EnrolError::from_search),
                    |processes| {
                        processes
                            .find_pod_netns(&uid.0, ips)
                            .map_err(EnrolError::from_search)
                    },
                )?;
                Ok((netns, FoundBy::Search))
            }
        }
    }
}

/// The capture status of the node's enrolled pods, by UID.
pub(crate) type CaptureStatus = BTreeMap<WorkloadUid, Capture>;

/// The enrolment loop of one node.
#[derive(Debug)]
pub(crate) struct Enrolment {
    pub(crate) node: String,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) capture: Arc<dyn CaptureBackend>,
    pub(crate) discovery: Discovery,
    pub(crate) certificates: Arc<CertificateManager>,
    pub(crate) client: HboneClient,
    pub(crate) states: watch::Receiver<Arc<ClusterState>>,
    pub(crate) readiness: Readiness,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) status: watch::Sender<CaptureStatus>,
    pub(crate) dns: Arc<NodeDns>,
    pub(crate) outbound_policy: OutboundTrafficPolicy,
    /// The listeners the agent this one replaced handed over, by pod.
    pub(crate) handed_over: HandedPods,
    /// Told once every pod is captured (the agent would report ready), or after
    /// [`TAKE_OVER_PATIENCE`]: what a successor waits for before it takes over.
    pub(crate) captured: Option<oneshot::Sender<()>>,
    /// A successor asking for the pods' listeners.
    pub(crate) offers: mpsc::Receiver<OfferRequest>,
}

#[derive(Debug)]
struct EnrolledPod {
    workload: LocalWorkload,
    /// What the pod's proxies serve and connect as; follows its service account, `None` while
    /// that makes no valid identity.
    identity: watch::Sender<Option<Identity>>,
    netns: PodNetns,
    found_by: FoundBy,
    /// What the proxies accept on, kept to hand over.
    listeners: Arc<CaptureTarget>,
    /// Dropping it stops the pod's proxies.
    proxies: DrainTrigger,
}

impl Enrolment {
    /// Keeps the node's pods captured until a drain starts, or a successor takes over. Then the
    /// proxies stop accepting and the connections they carry are waited for (this task holds
    /// the agent's drain watcher meanwhile); capture stays, so that new connections fail closed
    /// (or go to the successor).
    pub(crate) async fn run(mut self, mut drain: DrainWatcher) {
        let started = tokio::time::Instant::now();
        self.remove_leftovers().await;
        let mut pods = HashMap::new();
        loop {
            // A drain need not wait for a long pass: a pod enrolled halfway keeps its capture,
            // which fails closed, and the next agent enrols it.
            tokio::select! {
                () = drain.signaled() => break,
                () = self.reconcile(&mut pods) => {}
            }
            let (pending, refused) = {
                let status = self.status.borrow();
                let count = |f: fn(&Capture) -> bool| status.values().filter(|c| f(c)).count();
                // A refused pod is that pod's problem, reported on it: it does not hold back
                // the agent's readiness, which one pod could otherwise hold back at will.
                (
                    count(|c| matches!(c, Capture::Pending(_) | Capture::Failed(_))),
                    count(|c| matches!(c, Capture::Refused(_))),
                )
            };
            self.readiness.set(pending == 0);
            if (pending == 0 || started.elapsed() >= TAKE_OVER_PATIENCE)
                && let Some(captured) = self.captured.take()
            {
                let _ = captured.send(());
            }
            let refused = i64::try_from(refused).unwrap_or(i64::MAX);
            self.telemetry.metrics.refused_pods.set(refused);
            let enrolled = i64::try_from(pods.len()).unwrap_or(i64::MAX);
            self.telemetry.metrics.enrolled_pods.set(enrolled);
            tokio::select! {
                () = drain.signaled() => break,
                changed = self.states.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(RETRY_INTERVAL), if pending > 0 => {}
                Some(offer) = self.offers.recv() => match Self::offer(&pods, offer, &mut drain).await {
                    Some(Replaced::TakenOver) => {
                        self.capture.relinquish();
                        break;
                    }
                    Some(Replaced::Stopped) => break,
                    None => {}
                },
            }
        }
        let mut draining = tokio::task::JoinSet::new();
        for pod in pods.into_values() {
            draining.spawn(pod.proxies.drain());
        }
        draining.join_all().await;
    }

    /// Offers the pods' listeners to a successor, and waits, enrolling nothing, for the outcome:
    /// taken over, stopped (a drain started: the successor has not taken over, and capture
    /// stays this agent's until it exits), or `None`, to carry on.
    async fn offer(
        pods: &HashMap<WorkloadUid, EnrolledPod>,
        request: OfferRequest,
        drain: &mut DrainWatcher,
    ) -> Option<Replaced> {
        let offered = pods
            .values()
            .map(|pod| OfferedPod {
                uid: pod.workload.uid.clone(),
                netns: pod.netns.clone(),
                listeners: pod.listeners.clone(),
            })
            .collect();
        if request.pods.send(offered).is_err() {
            return None;
        }
        tokio::select! {
            () = drain.signaled() => Some(Replaced::Stopped),
            outcome = request.outcome => outcome.ok(),
        }
    }

    /// Brings the enrolled pods in line with the state, publishing where each pod stands as it
    /// goes: enrolling many pods takes a while.
    async fn reconcile(&mut self, pods: &mut HashMap<WorkloadUid, EnrolledPod>) {
        let state = self.states.borrow_and_update().clone();
        let torn_down = |uid: &WorkloadUid| {
            self.discovery
                .sandboxes()
                .is_some_and(|sandboxes| sandboxes.is_torn_down(uid))
        };
        // A pod whose sandbox the runtime tore down is released, whatever the API still says.
        let desired: HashMap<&WorkloadUid, &Arc<Workload>> = state
            .enrolled_on(&self.node)
            .into_iter()
            .filter(|w| !torn_down(&w.uid))
            .map(|w| (&w.uid, w))
            .collect();
        if let Some(sandboxes) = self.discovery.sandboxes() {
            sandboxes.forget_torn_down(|uid| state.has_workload(uid));
        }

        let left: Vec<WorkloadUid> = pods
            .keys()
            .filter(|uid| !desired.contains_key(uid))
            .cloned()
            .collect();
        for uid in left {
            if let Some(pod) = pods.remove(&uid) {
                self.release(pod).await;
            }
        }

        self.status.send_if_modified(|status| {
            let before = status.len();
            status.retain(|uid, _| desired.contains_key(uid));
            status.len() != before
        });
        // Pods the agent holds already may need their old capture released first, one by
        // one; new pods are enrolled side by side.
        let (known, new): (Vec<_>, Vec<_>) = desired
            .into_values()
            .partition(|workload| pods.contains_key(&workload.uid));
        for workload in known {
            let capture = self.reconcile_pod(workload, pods).await;
            self.publish(workload, capture);
        }
        let this = &*self;
        let mut enrolments = stream::iter(new.into_iter().cloned())
            .map(|workload| async move {
                let enrolled = this.enrol(workload.clone()).await;
                (workload, enrolled)
            })
            .buffer_unordered(CONCURRENT_ENROLMENTS);
        while let Some((workload, enrolled)) = enrolments.next().await {
            let capture = this.enrolled(&workload, enrolled, pods).await;
            this.publish(&workload, capture);
        }
        drop(enrolments);
        self.discovery.end_pass();
        self.release_unused_certificates(pods);
    }

    /// Brings one pod in line with `workload`. A pod stays captured through any change that
    /// keeps its address. One at a new address in another namespace is captured anew before the
    /// old capture is removed, and keeps the old one if that fails; in the same namespace its
    /// old proxies, which hold the pod's ports, stop first, and capture without them fails closed
    /// until the new ones are in.
    async fn reconcile_pod(
        &self,
        workload: &Arc<Workload>,
        pods: &mut HashMap<WorkloadUid, EnrolledPod>,
    ) -> Capture {
        let uid = &workload.uid;
        let ip = workload.ips.first();
        let new_sandbox = pods.get(uid).is_some_and(|pod| {
            self.discovery
                .sandbox(uid)
                .is_some_and(|sandbox| sandbox.id() != pod.netns.id())
        });
        if new_sandbox && let Some(old) = pods.remove(uid) {
            // The runtime made the pod a new sandbox, maybe at the same address: the old
            // namespace is on its way out, and the new one is captured afresh.
            self.release(old).await;
        }
        if let Some(pod) = pods.get(uid) {
            if ip == Some(&pod.workload.ip) {
                return self.follow_identity(pod, workload);
            }
            if ip.is_some()
                && self
                    .discovery
                    .find(workload)
                    .await
                    .is_ok_and(|(n, _)| n.id() == pod.netns.id())
                && let Some(pod) = pods.remove(uid)
            {
                drop(pod.proxies);
            }
        }
        let enrolled = self.enrol(workload.clone()).await;
        self.enrolled(workload, enrolled, pods).await
    }

    /// Takes in the outcome of enrolling `workload`, which replaces the pod's earlier
    /// enrolment, if any, once it succeeded.
    async fn enrolled(
        &self,
        workload: &Workload,
        enrolled: Result<EnrolledPod, EnrolError>,
        pods: &mut HashMap<WorkloadUid, EnrolledPod>,
    ) -> Capture {
        let uid = &workload.uid;
        match enrolled {
            Ok(pod) => {
                let identity = pod.identity.borrow().clone();
                tracing::info!(workload.uid = %uid, pod = workload.qualified_name(), identity = ?identity.map(|i| i.to_string()), "pod enrolled");
                let found_by = pod.found_by;
                if let Some(replaced) = pods.insert(uid.clone(), pod) {
                    self.release(replaced).await;
                }
                Capture::Captured(found_by)
            }
            Err(error) => {
                if let Some(stage) = error.stage() {
                    self.telemetry.metrics.capture_failed(stage);
                }
                if pods.contains_key(uid) {
                    // Not captured where it is now: retried, and not ready meanwhile.
                    let error = ErrorChain(&error).to_string();
                    Capture::Failed(format!(
                        "not captured at its new address, the capture at the old one stays: {error}"
                    ))
                } else {
                    error.capture()
                }
            }
        }
    }

    /// Records where the pod stands; a change is logged, and wakes those who follow the status.
    fn publish(&self, workload: &Workload, capture: Capture) {
        let uid = &workload.uid;
        let changed = self.status.send_if_modified(|status| {
            status.insert(uid.clone(), capture.clone()).as_ref() != Some(&capture)
        });
        if !changed {
            return;
        }
        let pod = workload.qualified_name();
        match capture {
            Capture::Captured(_) => {}
            Capture::Pending(error) => {
                tracing::info!(workload.uid = %uid, pod, error, "pod not enrolled yet");
            }
            Capture::Failed(error) => {
                tracing::warn!(workload.uid = %uid, pod, error, "pod not captured");
            }
            Capture::Refused(error) => {
                tracing::warn!(workload.uid = %uid, pod, error, "pod refused");
            }
        }
    }

    /// Points the pod's proxies at its identity, if its service account changed. A service
    /// account that makes no valid identity leaves the pod captured with proxies that refuse
    /// every connection: it fails closed rather than keep acting as its previous identity.
    fn follow_identity(&self, pod: &EnrolledPod, workload: &Workload) -> Capture {
        let identity = workload.identity(&self.trust_domain);
        let capture = match &identity {
            Ok(_) => Capture::Captured(pod.found_by),
            Err(error) => {
                let error = EnrolError::Identity(error.clone());
                self.telemetry.metrics.capture_failed("identity");
                tracing::warn!(
                    pod = workload.qualified_name(),
                    error = %ErrorChain(&error),
                    "refusing the pod's connections"
                );
                error.capture()
            }
        };
        let identity = identity.ok();
        let changed = pod.identity.send_if_modified(|current| {
            let changed = *current != identity;
            current.clone_from(&identity);
            changed
        });
        if changed && let Some(identity) = identity {
            tracing::info!(pod = workload.qualified_name(), %identity, "pod identity changed");
            self.warm_certificate(identity);
        }
        capture
    }

    /// Asks for the certificate now, so that the first connection does not wait for the CA.
    fn warm_certificate(&self, identity: Identity) {
        let certificates = self.certificates.clone();
        tokio::spawn(async move { certificates.fetch(&identity).await });
    }

    async fn enrol(&self, workload: Arc<Workload>) -> Result<EnrolledPod, EnrolError> {
        let ip = *workload.ips.first().ok_or(EnrolError::NoIp)?;
        let (netns, found_by) = self.discovery.find(&workload).await?;
        let netns = PodNetns::enter(netns).map_err(EnrolError::EnterNetns)?;
        let identity = workload
            .identity(&self.trust_domain)
            .map_err(EnrolError::Identity)?;
        self.warm_certificate(identity.clone());

        let (identity, identity_updates) = watch::channel(Some(identity));
        let (trigger, watcher) = drain::channel();
        let local = LocalWorkload {
            uid: workload.uid.clone(),
            ip,
        };
        let handed = self.handed_over.take(&local.uid, &netns, ip);
        let from_predecessor = handed.is_some();
        let listeners = Arc::new(match handed {
            Some(listeners) => listeners,
            None => proxy::listen(&netns, ip).await.map_err(EnrolError::Proxy)?,
        });
        let enrolled = async {
            let names = self.dns.names(&local);
            let pod = Pod {
                workload: local.clone(),
                identity: identity_updates,
                sockets: Arc::new(PodSockets(netns.clone())),
                state: self.states.clone(),
                client: self.client.clone(),
                trust_domain: self.trust_domain.clone(),
                telemetry: self.telemetry.clone(),
                admission: self.admission.clone(),
                revocations: self.revocations.clone(),
                balancer: self.balancer.clone(),
                names: names.clone(),
                dns: self.dns.clone(),
                outbound_policy: self.outbound_policy,
            };
            let started =
                proxy::start(pod, &listeners, &netns, self.certificates.clone(), watcher).await;
            if let Err(error) = started {
                self.dns.forget(&local.uid, &names);
                return Err(EnrolError::Proxy(error));
            }
            let capture = self.capture.clone();
            let target = listeners.clone();
            netns
                .run(move || capture.enable(&target))
                .await
                .map_err(|e| EnrolError::Capture(CaptureError::Netns(e)))?
                .map_err(EnrolError::Capture)?;
            if let Some(sandboxes) = self.discovery.sandboxes() {
                sandboxes.captured(&local.uid, netns.id());
            }
            Ok(EnrolledPod {
                workload: local.clone(),
                identity,
                netns: netns.clone(),
                found_by,
                listeners: listeners.clone(),
                proxies: trigger,
            })
        }
        .await;
        if enrolled.is_err()
            && from_predecessor
            && let Ok(listeners) = Arc::try_unwrap(listeners)
        {
            // The predecessor holds the pod's ports: the next attempt needs these.
            self.handed_over.put_back(local.uid, &netns, listeners);
        }
        enrolled
    }

    /// Stops the pod's proxies and removes its capture.
    async fn release(&self, pod: EnrolledPod) {
        let EnrolledPod {
            workload,
            netns,
            proxies,
            ..
        } = pod;
        drop(proxies);
        if let Some(sandboxes) = self.discovery.sandboxes() {
            sandboxes.released(&workload.uid, netns.id());
        }
        let capture = self.capture.clone();
        match netns.run(move || capture.disable()).await {
            Ok(Ok(())) => tracing::info!(workload.uid = %workload.uid, "pod released"),
            Ok(Err(error)) => {
                self.telemetry.metrics.capture_failed("release");
                tracing::warn!(workload.uid = %workload.uid, error = %ErrorChain(&error), "failed to remove capture")
            }
            Err(error) => {
                self.telemetry.metrics.capture_failed("release");
                tracing::warn!(workload.uid = %workload.uid, error = %ErrorChain(&error), "failed to reach the pod to remove capture")
            }
        }
    }

    /// Stops renewing the certificates of identities that no enrolled pod has any more.
    fn release_unused_certificates(&self, pods: &HashMap<WorkloadUid, EnrolledPod>) {
        let in_use: HashSet<Identity> = pods
            .values()
            .filter_map(|pod| pod.identity.borrow().clone())
            .collect();
        for identity in self.certificates.identities() {
            if !in_use.contains(&identity) {
                self.certificates.release(&identity);
            }
        }
    }

    /// Removes capture that an earlier agent left in pods of this node that are no longer
    /// enrolled (opted out, or their namespace left the mesh while no agent ran).
    async fn remove_leftovers(&self) {
        let state = self.states.borrow().clone();
        let not_enrolled = state
            .workloads()
            .into_iter()
            .filter(|w| w.node == self.node && w.protocol == Protocol::Tcp);
        for workload in not_enrolled {
            let Ok((netns, _)) = self.discovery.find(workload).await else {
                continue;
            };
            let Ok(netns) = PodNetns::enter(netns) else {
                continue;
            };
            let capture = self.capture.clone();
            let removed = netns
                .run(move || match capture.is_enabled() {
                    Ok(true) => capture.disable().map(|()| true),
                    other => other,
                })
                .await;
            if let Ok(Ok(true)) = removed {
                tracing::info!(
                    pod = workload.qualified_name(),
                    "removed capture left by an earlier run"
                );
            }
        }
    }
}
