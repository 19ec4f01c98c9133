//! The agent's side of the DNS proxy ([`ambit_dns`]): what the mesh answers for a pod's names,
//! and what every pod was answered, which egress control allows and `ambit debug dns` shows.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ambit_dns::{
    Answered, Client, DnsSockets, Limits, MeshName, Proxy, ReplySocketFuture, ReplySockets,
};
use ambit_redirect::PodNetns;
use ambit_redirect::socket::dns_reply_socket;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::admin::views::{DnsAnswerView, DnsView};
use crate::drain::DrainWatcher;
use crate::egress::{Resolution, Resolved};
use crate::state::{ClusterState, LocalWorkload, Workload, WorkloadUid};

/// Answers kept per pod for `ambit debug dns`.
const RECENT_PER_POD: usize = 64;

/// The node's DNS proxy and what it answered each of the node's pods.
#[derive(Debug)]
pub(crate) struct NodeDns {
    proxy: Arc<Proxy>,
    /// `cluster.local`: Services are `<name>.<namespace>.svc.<cluster domain>`.
    cluster_domain: Arc<str>,
    limits: Limits,
    pods: Mutex<HashMap<WorkloadUid, Arc<PodNames>>>,
}

impl NodeDns {
    pub(crate) fn new(proxy: Proxy, cluster_domain: &str, limits: Limits) -> Self {
        Self {
            proxy: Arc::new(proxy),
            cluster_domain: cluster_domain.trim_matches('.').to_ascii_lowercase().into(),
            limits,
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// A proxy forwarding to a server that is never asked, for tests of what does not resolve.
    #[cfg(test)]
    pub(crate) fn unused() -> Self {
        let mut resolv_conf = tempfile::NamedTempFile::new().unwrap();
        io::Write::write_all(&mut resolv_conf, b"nameserver 192.0.2.53\n").unwrap();
        let forwarder = ambit_dns::Forwarder::from_resolv_conf(resolv_conf.path()).unwrap();
        let metrics = ambit_dns::DnsMetrics::register(&mut Default::default());
        Self::new(
            Proxy::new(forwarder, metrics),
            "cluster.local",
            Limits::default(),
        )
    }

    /// What the pod will be answered, from now until its proxies stop: new for each enrolment,
    /// in place of an earlier one's.
    pub(crate) fn names(&self, workload: &LocalWorkload) -> Arc<PodNames> {
        let names = Arc::new(PodNames::default());
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        pods.insert(workload.uid.clone(), names.clone());
        names
    }

    /// Forgets the pod's `names`, unless it was enrolled again meanwhile, with names of its own.
    pub(crate) fn forget(&self, uid: &WorkloadUid, names: &Arc<PodNames>) {
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        if pods.get(uid).is_some_and(|known| Arc::ptr_eq(known, names)) {
            pods.remove(uid);
        }
    }

    /// Serves the pod's DNS on `sockets` until `drain` fires.
    pub(crate) async fn serve(
        self: Arc<Self>,
        workload: LocalWorkload,
        names: Arc<PodNames>,
        state: watch::Receiver<Arc<ClusterState>>,
        sockets: DnsSockets,
        mut drain: DrainWatcher,
    ) {
        let client = Arc::new(PodClient {
            workload: workload.clone(),
            state,
            cluster_domain: self.cluster_domain.clone(),
            names: names.clone(),
        });
        let served = ambit_dns::serve(self.proxy.clone(), client, sockets, self.limits, async {
            drain.signaled().await;
        })
        .await;
        if let Err(error) = served {
            tracing::error!(workload.uid = %workload.uid, %error, "the pod's DNS proxy stopped");
        }
        self.forget(&workload.uid, &names);
    }

    /// What the pod `uid` was answered, while it is served.
    pub(crate) fn pod_names(&self, uid: &WorkloadUid) -> Option<Arc<PodNames>> {
        let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        pods.get(uid).cloned()
    }

    /// What `ambit debug dns` shows of `workload`; `None` when this node does not serve it.
    pub(crate) fn view(&self, workload: &Workload) -> Option<DnsView> {
        let names = self.pod_names(&workload.uid)?;
        let answers = names
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect();
        Some(DnsView {
            pod: workload.qualified_name(),
            answers,
        })
    }
}

/// What one pod was answered.
#[derive(Debug, Default)]
pub(crate) struct PodNames {
    /// The addresses of ServiceEntry hosts it resolved: what `REGISTRY_ONLY` lets it reach.
    pub(crate) resolved: Resolved,
    recent: Mutex<VecDeque<DnsAnswerView>>,
}

/// The pod's sockets bound to the servers it asked, which steered queries are answered from;
/// opened in its namespace when first needed, and kept: a pod asks one or two servers.
#[derive(Debug)]
pub(crate) struct PodReplySockets {
    netns: PodNetns,
    bound: Mutex<HashMap<SocketAddrV4, Arc<UdpSocket>>>,
}

/// Servers a pod's sockets are kept for; a pod asking more gets a socket per reply beyond.
const REPLY_SOCKETS_PER_POD: usize = 16;

impl PodReplySockets {
    pub(crate) fn new(netns: PodNetns) -> Self {
        Self {
            netns,
            bound: Mutex::new(HashMap::new()),
        }
    }
}

impl ReplySockets for PodReplySockets {
    fn bound_to(&self, server: SocketAddrV4) -> ReplySocketFuture<'_> {
        Box::pin(async move {
            let known = self
                .bound
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&server)
                .cloned();
            if let Some(socket) = known {
                return Ok(socket);
            }
            let socket = self
                .netns
                .run_here(|| dns_reply_socket(server.into()))
                .map_err(io::Error::other)??;
            let socket = Arc::new(UdpSocket::from_std(socket)?);
            let mut bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
            if bound.len() < REPLY_SOCKETS_PER_POD {
                bound.insert(server, socket.clone());
            }
            Ok(socket)
        })
    }
}

/// One pod, as the proxy asks about it.
struct PodClient {
    workload: LocalWorkload,
    state: watch::Receiver<Arc<ClusterState>>,
    cluster_domain: Arc<str>,
    names: Arc<PodNames>,
}

impl Client for PodClient {
    fn mesh_name(&self, name: &str) -> Option<MeshName> {
        let state = self.state.borrow();
        let namespace = &self.workload.current(&state)?.namespace;
        mesh_name(&state, &self.cluster_domain, namespace, name)
    }

    fn answered(&self, answer: &Answered<'_>) {
        let now = Instant::now();
        if !answer.addresses.is_empty() {
            let state = self.state.borrow();
            let listed = self.workload.current(&state).is_some_and(|w| {
                state
                    .service_entries()
                    .for_host(&w.namespace, answer.name)
                    .next()
                    .is_some()
            });
            if listed {
                self.names
                    .resolved
                    .record(answer.name, &answer.addresses, answer.ttl, now);
            }
        }
        let seen = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let view = DnsAnswerView {
            name: answer.name.to_owned(),
            query_type: answer.query_type.to_string(),
            code: answer.code.to_string(),
            addresses: answer.addresses.clone(),
            ttl_s: answer.ttl.as_secs(),
            source: answer.source.as_str().to_owned(),
            at_unix: seen,
        };
        let mut recent = self
            .names
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT_PER_POD {
            recent.pop_front();
        }
        recent.push_back(view);
    }

    fn canonical(&self) -> (String, String) {
        let state = self.state.borrow();
        self.workload.current(&state).map_or_else(
            || ("unknown".to_owned(), "unknown".to_owned()),
            |w| {
                (
                    w.canonical_service().to_owned(),
                    w.canonical_revision().to_owned(),
                )
            },
        )
    }
}

/// What the mesh says of `name` to a pod of `namespace`: a Service's VIPs
/// (`<service>.<namespace>.svc.<cluster domain>`), a headless Service's ready endpoints, one of
/// them by its hostname (`<hostname>.<service>.<namespace>.svc.<cluster domain>`, a
/// StatefulSet's pods), or a `STATIC` ServiceEntry's endpoints (the name's only records). `None`
/// for anything else, and for a name with no address to give (an ExternalName Service, a headless
/// Service with no ready endpoint): upstream answers those.
fn mesh_name(
    state: &ClusterState,
    cluster_domain: &str,
    namespace: &str,
    name: &str,
) -> Option<MeshName> {
    let in_cluster = name
        .strip_suffix(cluster_domain)
        .and_then(|rest| rest.strip_suffix(".svc."));
    if let Some(rest) = in_cluster {
        let labels: Vec<&str> = rest.split('.').collect();
        let (hostname, service, service_namespace) = match labels[..] {
            [service, service_namespace] => (None, service, service_namespace),
            [hostname, service, service_namespace] => (Some(hostname), service, service_namespace),
            _ => return None,
        };
        let service = state.service(service_namespace, service)?;
        let addresses: Vec<IpAddr> = match hostname {
            None if !service.vips.is_empty() => service.vips.clone(),
            _ if !service.vips.is_empty() => return None,
            hostname => service
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter(|e| hostname.is_none_or(|h| e.hostname.as_deref() == Some(h)))
                .map(|e| e.ip)
                .collect(),
        };
        return (!addresses.is_empty()).then_some(MeshName {
            addresses,
            addresses_only: false,
        });
    }
    state
        .service_entries()
        .for_host(namespace, name)
        .find(|e| e.resolution == Resolution::Static)
        .map(|e| MeshName {
            addresses: e.endpoints.clone(),
            addresses_only: true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{port: 5432}]
endpoints:
- {addresses: [10.244.1.5], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.244.2.6], hostname: db-1, conditions: {ready: true}}
- {addresses: [10.244.2.7], hostname: db-2, conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: docs, namespace: shop}
spec: {type: ExternalName, externalName: docs.example.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.corp.internal]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}, {address: 192.0.2.11}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: billing}
spec:
  hosts: [ledger.corp.internal]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.20}]
  exportTo: ["."]
"#;

    fn lookup(name: &str) -> Option<Vec<String>> {
        let state = parse(CLUSTER, "istio-system").unwrap();
        let mesh = mesh_name(&state, "cluster.local", "shop", name)?;
        Some(mesh.addresses.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn services_answer_their_vips() {
        assert_eq!(
            lookup("web.shop.svc.cluster.local").unwrap(),
            ["10.96.0.10"]
        );
        assert_eq!(lookup("web.other.svc.cluster.local"), None);
        assert_eq!(lookup("web.shop.svc.cluster.example"), None);
        assert_eq!(
            lookup("x.web.shop.svc.cluster.local"),
            None,
            "no per-pod names under a VIP"
        );
    }

    #[test]
    fn headless_services_answer_their_ready_endpoints_and_each_by_hostname() {
        assert_eq!(
            lookup("db.shop.svc.cluster.local").unwrap(),
            ["10.244.1.5", "10.244.2.6"]
        );
        assert_eq!(
            lookup("db-1.db.shop.svc.cluster.local").unwrap(),
            ["10.244.2.6"]
        );
        assert_eq!(lookup("db-2.db.shop.svc.cluster.local"), None, "not ready");
    }

    #[test]
    fn names_without_addresses_are_left_to_upstream() {
        assert_eq!(lookup("docs.shop.svc.cluster.local"), None, "ExternalName");
        assert_eq!(lookup("example.com"), None);
    }

    #[test]
    fn static_service_entries_answer_their_endpoints_where_exported() {
        assert_eq!(
            lookup("legacy.corp.internal").unwrap(),
            ["192.0.2.10", "192.0.2.11"]
        );
        assert_eq!(
            lookup("ledger.corp.internal"),
            None,
            "exported to billing only"
        );
    }
}
