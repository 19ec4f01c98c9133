//! The Kubernetes source: reflectors on the API server's Namespaces, Pods, Services,
//! EndpointSlices and Istio policies, turned into a cluster state by the same translation as the
//! file source.
//!
//! Nothing is published before every kind has been listed once: a state without the policies
//! would allow what they deny. After that, the last good view stays whatever the API server
//! does (restarts, relists, `410 Gone`): a relist replaces a kind's objects only once it is
//! complete, and an API server that went away releases nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use self::unseen::UnseenPods;
use super::translate::{Objects, Origin, Sourced};
use crate::drain::DrainWatcher;
use crate::enrolment::CaptureStatus;
use crate::error_chain::ErrorChain;
use crate::sandboxes::Sandboxes;
use crate::state::ClusterState;

mod status;
mod trim;
mod unseen;

/// How long a burst of changes is gathered into one new state.
const SETTLE: Duration = Duration::from_millis(50);
/// Istio's API group of AuthorizationPolicy and PeerAuthentication.
const ISTIO_SECURITY: &str = "security.istio.io";
/// Istio's API group of ServiceEntry.
const ISTIO_NETWORKING: &str = "networking.istio.io";
/// What the source logs each time it publishes a state.
pub const STATE_UPDATED: &str = "cluster state updated";

/// Why the source could not reach the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("failed to read the kubeconfig {0}")]
    Kubeconfig(String, #[source] kube::config::KubeconfigError),
    #[error("not running in a cluster, and no --kubeconfig given")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("failed to build the API client")]
    Client(#[source] kube::Error),
}

/// The cluster as the API server describes it.
pub struct KubernetesSource {
    client: Client,
    node: String,
    root_namespace: String,
    sandboxes: Sandboxes,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("node", &self.node)
            .field("root_namespace", &self.root_namespace)
            .finish_non_exhaustive()
    }
}

/// A client of the API server of `kubeconfig`, or of the service account this process runs as
/// in a pod when there is none.
pub(crate) async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| KubernetesError::Kubeconfig(path.display().to_string(), e))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubernetesError::Kubeconfig(path.display().to_string(), e))?
        }
        None => Config::incluster().map_err(KubernetesError::InCluster)?,
    };
    Client::try_from(config).map_err(KubernetesError::Client)
}

impl KubernetesSource {
    /// A source reading the cluster of `kubeconfig`, or of the service account the agent runs
    /// as when there is none.
    pub(crate) async fn connect(
        kubeconfig: Option<&Path>,
        node: &str,
        root_namespace: &str,
        sandboxes: Sandboxes,
    ) -> Result<Self, KubernetesError> {
        Ok(Self {
            client: client(kubeconfig).await?,
            node: node.to_owned(),
            root_namespace: root_namespace.to_owned(),
            sandboxes,
        })
    }

    /// Watches the cluster and publishes a state into `states` once every kind is listed, then
    /// at every change, until a drain starts. Writes what the agent did with the node's pods
    /// (`capture`) back to them.
    pub(crate) async fn run(
        self,
        states: watch::Sender<Arc<ClusterState>>,
        capture: watch::Receiver<CaptureStatus>,
        mut drain: DrainWatcher,
    ) {
        let progress = Arc::new(Progress::default());
        let reflectors = Reflectors::start(&self.client, &progress);
        tokio::spawn(status::Writer::new(self.client.clone(), &self.node).run(
            reflectors.pods.clone(),
            states.subscribe(),
            capture,
            drain.clone(),
        ));
        let mut published = Published::default();
        let mut sandboxes = self.sandboxes.subscribe();
        let mut unseen = UnseenPods::new(self.client.clone());
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                () = progress.changed.notified() => {}
                // A pod being created, with the addresses the runtime gave it.
                _ = sandboxes.changed() => {}
                Some(pod) = unseen.arrival() => unseen.keep(pod),
            }
            // Let a burst of events (a relist, a rollout) settle into one state.
            tokio::time::sleep(SETTLE).await;
            let waiting = progress.waiting_for();
            if !waiting.is_empty() {
                tracing::info!(waiting_for = ?waiting, "waiting for the API server's initial lists");
                continue;
            }
            let version = progress.version();
            unseen.ask(&self.sandboxes, &reflectors.pods);
            let mut objects = reflectors.objects(self.sandboxes.addresses());
            objects.pods.extend(unseen.pods().map(from_api));
            let root_namespace = self.root_namespace.clone();
            let translated =
                tokio::task::spawn_blocking(move || objects.translate(&root_namespace))
                    .await
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
            published.report(&translated.errors, translated.state.rejected_policies());
            let workloads = translated.state.workloads().len();
            states.send_replace(Arc::new(translated.state));
            tracing::info!(resource_version = version, workloads, "{STATE_UPDATED}");
        }
    }
}

/// The kinds the source watches. Istio's policies are optional: without their CRDs there are
/// none, and the source tries again until the CRDs exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
    ServiceEntry,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::ServiceEntry,
    ];

    /// The Istio API group of one of Istio's kinds.
    fn istio_group(self) -> Option<&'static str> {
        match self {
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => Some(ISTIO_SECURITY),
            Kind::ServiceEntry => Some(ISTIO_NETWORKING),
            _ => None,
        }
    }
}

/// What the reflectors tell the publisher: which kinds are listed, and that something changed.
#[derive(Debug, Default)]
struct Progress {
    listed: Mutex<BTreeSet<Kind>>,
    /// The highest resource version seen, for logs and tests.
    version: Mutex<Option<String>>,
    changed: Notify,
}

impl Progress {
    fn listed(&self, kind: Kind) {
        self.listed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(kind);
        self.changed.notify_one();
    }

    fn changed(&self, version: Option<&String>) {
        self.saw(version);
        self.changed.notify_one();
    }

    /// Keeps the highest version seen. Versions are opaque to clients; this one is only logged,
    /// and compared as a number where it is one.
    fn saw(&self, version: Option<&String>) {
        let Some(version) = version else { return };
        let mut latest = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let number = |v: &String| v.parse::<u64>().ok();
        if latest.as_ref().and_then(number) <= number(version) {
            *latest = Some(version.clone());
        }
    }

    fn waiting_for(&self) -> Vec<Kind> {
        let listed = self.listed.lock().unwrap_or_else(PoisonError::into_inner);
        Kind::ALL
            .into_iter()
            .filter(|kind| !listed.contains(kind))
            .collect()
    }

    fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The stores of every kind, each filled by its own task; dropping them stops the tasks.
struct Reflectors {
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    authorization_policies: Store<DynamicObject>,
    peer_authentications: Store<DynamicObject>,
    service_entries: Store<DynamicObject>,
    _tasks: JoinSet<()>,
}

impl Reflectors {
    fn start(client: &Client, progress: &Arc<Progress>) -> Self {
        let mut spawner = Spawner {
            client,
            progress,
            tasks: JoinSet::new(),
        };
        Self {
            namespaces: spawner.typed(Kind::Namespace, trim::namespace),
            nodes: spawner.typed(Kind::Node, trim::node),
            pods: spawner.typed(Kind::Pod, trim::pod),
            services: spawner.typed(Kind::Service, trim::service),
            endpoint_slices: spawner.typed(Kind::EndpointSlice, trim::endpoint_slice),
            authorization_policies: spawner.istio(
                Kind::AuthorizationPolicy,
                ("AuthorizationPolicy", "authorizationpolicies"),
            ),
            peer_authentications: spawner.istio(
                Kind::PeerAuthentication,
                ("PeerAuthentication", "peerauthentications"),
            ),
            service_entries: spawner.istio(Kind::ServiceEntry, ("ServiceEntry", "serviceentries")),
            _tasks: spawner.tasks,
        }
    }

    /// A snapshot of every store, with the addresses runtimes gave pods being created.
    fn objects(&self, sandbox_addresses: HashMap<String, Vec<IpAddr>>) -> Objects {
        // Policies go through JSON, as the file's do, so that they parse the same way. One that
        // does not serialize keeps its name and namespace, and no spec that parses: it stands in
        // as fail-closed where it belongs.
        let json = |policy: Arc<DynamicObject>| {
            let value = serde_json::to_value(&*policy).unwrap_or_else(|_| {
                let metadata = &policy.metadata;
                serde_json::json!({
                    "metadata": {"name": metadata.name, "namespace": metadata.namespace},
                    "spec": "unreadable",
                })
            });
            from_api(Arc::new(value))
        };
        Objects {
            namespaces: self.namespaces.state(),
            nodes: self.nodes.state(),
            pods: self.pods.state().into_iter().map(from_api).collect(),
            services: self.services.state().into_iter().map(from_api).collect(),
            endpoint_slices: self.endpoint_slices.state(),
            authorization_policies: self
                .authorization_policies
                .state()
                .into_iter()
                .map(json)
                .collect(),
            peer_authentications: self
                .peer_authentications
                .state()
                .into_iter()
                .map(json)
                .collect(),
            service_entries: self.service_entries.state().into_iter().map(json).collect(),
            sandbox_addresses,
        }
    }
}

/// What every watched kind is, to be stored and compared.
trait Watched:
    kube::Resource + Clone + PartialEq + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource
        + Clone
        + PartialEq
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Starts the task of each store.
struct Spawner<'a> {
    client: &'a Client,
    progress: &'a Arc<Progress>,
    tasks: JoinSet<()>,
}

impl Spawner<'_> {
    /// A store of one of Kubernetes' own kinds.
    fn typed<K: Watched<DynamicType = ()>>(&mut self, kind: Kind, trim: fn(&mut K)) -> Store<K> {
        let (store, writer) = reflector::store();
        let api = Api::all(self.client.clone());
        self.spawn(api, (), writer, trim, kind);
        store
    }

    /// A store of one of Istio's `security.istio.io/v1` kinds.
    fn istio(&mut self, kind: Kind, (name, plural): (&str, &str)) -> Store<DynamicObject> {
        let group = kind.istio_group().unwrap_or(ISTIO_SECURITY);
        let gvk = GroupVersionKind::gvk(group, "v1", name);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let writer = reflector::store::Writer::new(resource.clone());
        let store = writer.as_reader();
        let api = Api::all_with(self.client.clone(), &resource);
        self.spawn(api, resource, writer, trim::policy, kind);
        store
    }

    fn spawn<K: Watched>(
        &mut self,
        api: Api<K>,
        dyntype: K::DynamicType,
        writer: reflector::store::Writer<K>,
        trim: fn(&mut K),
        kind: Kind,
    ) where
        K::DynamicType: Clone + Eq + std::hash::Hash + Send,
    {
        let reflect = reflect(
            self.client.clone(),
            api,
            dyntype,
            writer,
            trim,
            kind,
            self.progress.clone(),
        );
        self.tasks.spawn(reflect);
    }
}

fn from_api<T>(object: Arc<T>) -> Sourced<T> {
    Sourced {
        origin: Origin::Api,
        object,
    }
}

/// Keeps `writer`'s store in line with the API server, trimming each object to what the model
/// needs. A relist replaces the store only when complete, so the last good view stays meanwhile.
async fn reflect<K>(
    client: Client,
    api: Api<K>,
    dyntype: K::DynamicType,
    mut writer: reflector::store::Writer<K>,
    trim: fn(&mut K),
    kind: Kind,
    progress: Arc<Progress>,
) where
    K: Watched,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    let store = writer.as_reader();
    let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut absent = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let version = match &event {
                    Event::Apply(object) | Event::Delete(object) | Event::InitApply(object) => {
                        object.meta().resource_version.clone()
                    }
                    Event::Init | Event::InitDone => None,
                };
                let event = event.modify(trim);
                // An update of what the model does not read.
                let unchanged = matches!(&event, Event::Apply(object)
                    if store.get(&ObjectRef::from_obj_with(object, dyntype.clone())).as_deref() == Some(object));
                writer.apply_watcher_event(&event);
                match &event {
                    Event::InitDone => {
                        if absent {
                            tracing::info!(?kind, "the kind is served now");
                            absent = false;
                        }
                        progress.listed(kind);
                        progress.changed(None);
                    }
                    Event::Apply(_) | Event::Delete(_) if !unchanged => {
                        progress.changed(version.as_ref());
                    }
                    Event::Apply(_) | Event::Delete(_) | Event::InitApply(_) => {
                        progress.saw(version.as_ref());
                    }
                    Event::Init => {}
                }
            }
            Err(error) if kind.istio_group().is_some() && is_not_found(&error) => {
                // Without Istio's API group there can be no such objects: nothing to wait for.
                // With it, they exist in a form this agent does not read (an Istio older than
                // 1.22 serves only v1beta1): waiting is the one safe answer.
                let group = kind.istio_group().unwrap_or(ISTIO_SECURITY);
                match serves_group(&client, group).await {
                    Ok(false) => {
                        if !absent {
                            tracing::warn!(
                                ?kind,
                                "the API server does not serve this kind (are Istio's CRDs installed?); watching for it"
                            );
                            absent = true;
                        }
                        progress.listed(kind);
                    }
                    Ok(true) => tracing::error!(
                        ?kind,
                        group,
                        "the group is served, but not this kind in v1 (Istio older than 1.22?): enrolling nothing until it is"
                    ),
                    Err(error) => tracing::warn!(
                        ?kind,
                        error = %ErrorChain(&error),
                        "the API server does not serve this kind, and its API groups could not be listed; trying again"
                    ),
                }
            }
            Err(error) => {
                tracing::warn!(?kind, error = %ErrorChain(&error), "watching the API server; keeping the last good state");
            }
        }
    }
}

/// Whether the API server serves the API group `name` at all.
async fn serves_group(client: &Client, name: &str) -> Result<bool, kube::Error> {
    let groups = client.list_api_groups().await?;
    Ok(groups.groups.iter().any(|group| group.name == name))
}

fn is_not_found(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404
    )
}

/// What the last published state said was wrong, so that each problem is logged once.
#[derive(Debug, Default)]
struct Published {
    errors: Vec<String>,
    rejected: Vec<String>,
}

impl Published {
    fn report(&mut self, errors: &[super::ObjectError], rejected: &[String]) {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for error in errors.iter().filter(|e| !self.errors.contains(e)) {
            tracing::error!(error, "object left out of the cluster state");
        }
        for error in rejected.iter().filter(|e| !self.rejected.contains(e)) {
            tracing::error!(error, "policy rejected: enforcing it as fail-closed");
        }
        self.errors = errors;
        self.rejected = rejected.to_vec();
    }
}
