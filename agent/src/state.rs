//! What the agent knows about the cluster: workloads and services, indexed by address, and the
//! decisions taken from them (who is enrolled here, where a connection goes). Pure: built by a
//! source, read by the proxies.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_identity::{Identity, IdentityError, TrustDomain};
use ambit_redirect::HBONE_PORT;

use crate::balance::{Balancer, Lease};
use crate::egress::{OutboundTrafficPolicy, ServiceEntries};
use crate::policy::{AuthorizationPolicies, PeerAuthentications};

/// A Kubernetes pod's UID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadUid(pub String);

impl std::fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// In the mesh: through HBONE to its port 15008.
    Hbone,
    /// Outside the mesh: plain TCP.
    Tcp,
}

/// A pod, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: WorkloadUid,
    /// The pod's name.
    pub name: String,
    /// The name of what runs the pod (its Deployment, StatefulSet, ...), or the pod's name: what
    /// metrics call the workload, so that a rollout does not create new series.
    pub workload_name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub protocol: Protocol,
    /// Where its node is, from the node's topology labels.
    pub locality: Locality,
    /// The waypoint that traffic addressed to the pod itself goes through.
    pub waypoint: Option<WaypointRef>,
}

/// A waypoint, by the Service in front of its pods: what `istio.io/use-waypoint` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A node's region and zone, from its `topology.kubernetes.io/region` and `.../zone` labels;
/// `None` where the node has none, or is not known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Workload {
    pub fn identity(&self, trust_domain: &TrustDomain) -> Result<Identity, IdentityError> {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// The service the workload is part of, as Istio names it for telemetry.
    pub fn canonical_service(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|label| self.labels.get(*label))
        .unwrap_or(&self.workload_name)
    }

    /// The version of the workload's service, as Istio names it for telemetry.
    pub fn canonical_revision(&self) -> &str {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|label| self.labels.get(*label))
        .map_or("latest", String::as_str)
    }

    /// `namespace/name`, for logs and summaries.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One of this node's enrolled pods, as its proxies refer to it. What the cluster says about
/// it (labels, service account) is read from the state at each decision: those can change while
/// the pod stays captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWorkload {
    pub uid: WorkloadUid,
    pub ip: IpAddr,
}

impl LocalWorkload {
    /// The pod as `state` describes it; `None` once it left the state (it is being released).
    pub fn current<'s>(&self, state: &'s ClusterState) -> Option<&'s Arc<Workload>> {
        state.workload_by_ip(self.ip).filter(|w| w.uid == self.uid)
    }
}

/// A port of a service and where it leads on the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// The endpoints' port: a number, or the name of a port that each endpoint resolves.
    pub target: TargetPort,
    pub protocol: AppProtocol,
}

/// What a Service port carries, as Istio selects it: its `appProtocol`, else its name's prefix
/// (`http-web`); a waypoint speaks HTTP on HTTP ports, and carries bytes on the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Tcp,
    /// `http`: HTTP/1.1.
    Http1,
    /// `http2`, `grpc`, `h2c`.
    Http2,
}

impl AppProtocol {
    pub fn of(app_protocol: Option<&str>, name: Option<&str>) -> Self {
        let prefix = name.map(|n| n.split_once('-').map_or(n, |(prefix, _)| prefix));
        app_protocol
            .and_then(Self::named)
            .or_else(|| prefix.and_then(Self::named))
            .unwrap_or(Self::Tcp)
    }

    /// The protocol Istio knows by `name`; `None` for a name it does not.
    fn named(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "http" | "grpc-web" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(Self::Http1),
            "http2" | "grpc" | "h2c" | "kubernetes.io/h2c" => Some(Self::Http2),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Some(Self::Tcp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

/// One address behind a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    /// Port names to numbers, as the EndpointSlice lists them.
    pub ports: BTreeMap<String, u16>,
    /// The pod's own DNS label under a headless Service (a StatefulSet's pods):
    /// `<hostname>.<service>.<namespace>.svc.<cluster domain>`.
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// The waypoint that traffic addressed to the Service goes through.
    pub waypoint: Option<WaypointRef>,
    /// Whether the Service is itself a waypoint's (`istio.io/waypoint-for`, or deployed by
    /// istiod).
    pub is_waypoint: bool,
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Through HBONE to the workload's port 15008, asking for `authority`.
    Hbone {
        workload: Arc<Workload>,
        hbone_addr: SocketAddr,
        authority: SocketAddr,
    },
    /// Plain TCP to `addr`: a destination outside the mesh.
    Passthrough { addr: SocketAddr },
    /// A service port with no ready endpoint: the connection is refused.
    NoEndpoint { service: String, port: u16 },
    /// The destination's waypoint cannot be reached: the connection is refused rather than
    /// sent around the waypoint.
    NoWaypoint {
        waypoint: WaypointRef,
        reason: &'static str,
    },
}

/// One consistent view of the cluster.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    workloads: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<IpAddr, Arc<Service>>,
    /// For each endpoint IP, the Services of its own namespace it backs whose `targetRefs`
    /// policies it enforces: those without a waypoint, which enforces them instead.
    services_of: HashMap<IpAddr, Vec<String>>,
    /// For each endpoint IP, every Service it backs.
    endpoint_services: HashMap<IpAddr, Vec<Arc<Service>>>,
    /// Services by namespace and name.
    services_by_name: HashMap<(String, String), Arc<Service>>,
    /// For each workload IP, the waypoints in front of it: its own and its Services'.
    waypoints_of: HashMap<IpAddr, Vec<WaypointRef>>,
    authorization: AuthorizationPolicies,
    peer_authentication: PeerAuthentications,
    /// Policies that did not compile, with why; each stands in as fail-closed.
    rejected_policies: Vec<String>,
    service_entries: ServiceEntries,
    /// The namespaces whose label sets their pods' outbound traffic policy.
    outbound_policies: HashMap<String, OutboundTrafficPolicy>,
}

impl ClusterState {
    pub fn new(
        workloads: impl IntoIterator<Item = Workload>,
        services: impl IntoIterator<Item = Service>,
    ) -> Self {
        let mut state = Self::default();
        for workload in workloads {
            let workload = Arc::new(workload);
            for ip in &workload.ips {
                state.workloads.insert(*ip, workload.clone());
            }
        }
        for service in services {
            let service = Arc::new(service);
            state.services_by_name.insert(
                (service.namespace.clone(), service.name.clone()),
                service.clone(),
            );
            for vip in &service.vips {
                state.services.insert(*vip, service.clone());
            }
            for endpoint in &service.endpoints {
                state
                    .endpoint_services
                    .entry(endpoint.ip)
                    .or_default()
                    .push(service.clone());
                let same_namespace = state
                    .workloads
                    .get(&endpoint.ip)
                    .is_some_and(|w| w.namespace == service.namespace);
                if same_namespace && service.waypoint.is_none() {
                    state
                        .services_of
                        .entry(endpoint.ip)
                        .or_default()
                        .push(service.name.clone());
                }
            }
        }
        // By workload, over all its addresses: a Service that lists only one of a dual-stack
        // pod's addresses puts its waypoint in front of the other as well. Only Services of the
        // pod's own namespace count: an EndpointSlice may list any address.
        let mut waypoints_of = HashMap::new();
        for workload in state.workloads() {
            let services = workload
                .ips
                .iter()
                .filter_map(|ip| state.endpoint_services.get(ip))
                .flatten()
                .filter(|s| s.namespace == workload.namespace);
            let mut waypoints: Vec<WaypointRef> = workload
                .waypoint
                .iter()
                .chain(services.filter_map(|s| s.waypoint.as_ref()))
                .cloned()
                .collect();
            waypoints.sort();
            waypoints.dedup();
            if !waypoints.is_empty() {
                for ip in &workload.ips {
                    waypoints_of.insert(*ip, waypoints.clone());
                }
            }
        }
        state.waypoints_of = waypoints_of;
        state
    }

    /// The waypoints in front of the workload at `ip`: its own, and those of the Services it
    /// backs. Connections to it are meant to come from them.
    pub fn waypoints_of(&self, ip: IpAddr) -> &[WaypointRef] {
        self.waypoints_of.get(&ip).map_or(&[], Vec::as_slice)
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services_by_name
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The Service whose VIP and port `destination` is, if it is one.
    pub fn addressed_service(&self, destination: SocketAddr) -> Option<&Arc<Service>> {
        self.services
            .get(&destination.ip())
            .filter(|s| s.ports.iter().any(|p| p.port == destination.port()))
    }

    /// The names of the Services (of its own namespace, without a waypoint) that the workload at
    /// `ip` backs: those whose `targetRefs` policies it enforces.
    pub fn services_of(&self, ip: IpAddr) -> &[String] {
        self.services_of.get(&ip).map_or(&[], Vec::as_slice)
    }

    /// The Service a connection to `destination` is reported under: the one whose VIP and
    /// port it addressed, else the first one the destination is an endpoint of.
    pub fn destination_service(&self, destination: SocketAddr) -> Option<&Arc<Service>> {
        self.addressed_service(destination)
            .or_else(|| self.endpoint_services.get(&destination.ip())?.first())
    }

    /// Every Service once, sorted by namespace and name.
    pub fn services(&self) -> Vec<&Arc<Service>> {
        let mut services: Vec<_> = self.services.values().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        services.dedup_by(|a, b| Arc::ptr_eq(a, b));
        services
    }

    /// The same state with these policies.
    pub fn with_policies(
        mut self,
        authorization: AuthorizationPolicies,
        peer_authentication: PeerAuthentications,
        rejected_policies: Vec<String>,
    ) -> Self {
        self.authorization = authorization;
        self.peer_authentication = peer_authentication;
        self.rejected_policies = rejected_policies;
        self
    }

    /// The same state with these ServiceEntries and namespaces' outbound traffic policies.
    pub fn with_egress(
        mut self,
        service_entries: ServiceEntries,
        outbound_policies: HashMap<String, OutboundTrafficPolicy>,
    ) -> Self {
        self.service_entries = service_entries;
        self.outbound_policies = outbound_policies;
        self
    }

    pub fn service_entries(&self) -> &ServiceEntries {
        &self.service_entries
    }

    /// The outbound traffic policy of `namespace`'s pods: its label's, else `default`.
    pub fn outbound_policy(
        &self,
        namespace: &str,
        default: OutboundTrafficPolicy,
    ) -> OutboundTrafficPolicy {
        self.outbound_policies
            .get(namespace)
            .copied()
            .unwrap_or(default)
    }

    pub fn authorization(&self) -> &AuthorizationPolicies {
        &self.authorization
    }

    pub fn peer_authentication(&self) -> &PeerAuthentications {
        &self.peer_authentication
    }

    /// Why each rejected policy was rejected.
    pub fn rejected_policies(&self) -> &[String] {
        &self.rejected_policies
    }

    /// Whether the pod `uid` is in this state.
    pub fn has_workload(&self, uid: &WorkloadUid) -> bool {
        self.workloads.values().any(|w| w.uid == *uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// Every workload once, in a stable order.
    pub fn workloads(&self) -> Vec<&Arc<Workload>> {
        let mut workloads: Vec<_> = self.workloads.values().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        workloads.dedup_by(|a, b| a.uid == b.uid);
        workloads
    }

    /// The workloads of `node` whose traffic this node's agent captures.
    pub fn enrolled_on(&self, node: &str) -> Vec<&Arc<Workload>> {
        self.workloads()
            .into_iter()
            .filter(|w| w.node == node && w.protocol == Protocol::Hbone)
            .collect()
    }

    /// Where a connection from `source` to `destination` goes: to the destination's waypoint
    /// when it has one (a Service's for traffic to its VIP, a pod's for traffic to the pod), else
    /// a service VIP to the ready endpoint `balancer` chooses, a mesh workload through HBONE,
    /// anything else directly; with the lease that counts the connection at the endpoint chosen.
    pub(crate) fn resolve(
        &self,
        source: IpAddr,
        destination: SocketAddr,
        balancer: &Arc<Balancer>,
    ) -> (Upstream, Option<Lease>) {
        let service = self.addressed_service(destination);
        let waypoint = match service {
            Some(service) => service.waypoint.as_ref(),
            None => self
                .workloads
                .get(&destination.ip())
                .and_then(|w| w.waypoint.as_ref()),
        };
        if let Some(waypoint) = waypoint
            && let Some(routed) = self.through_waypoint(waypoint, source, destination, balancer)
        {
            return routed;
        }
        self.resolve_direct(destination, balancer)
    }

    /// Where a connection to `destination` goes past any waypoint: what a waypoint does with
    /// the connections sent to it.
    pub(crate) fn resolve_direct(
        &self,
        destination: SocketAddr,
        balancer: &Arc<Balancer>,
    ) -> (Upstream, Option<Lease>) {
        let Some(service) = self.addressed_service(destination) else {
            return (self.to_address(destination), None);
        };
        let Some(port) = service.ports.iter().find(|p| p.port == destination.port()) else {
            return (self.to_address(destination), None);
        };
        let ready: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| Some(SocketAddr::new(e.ip, endpoint_port(e, port)?)))
            .collect();
        if ready.is_empty() {
            let refused = Upstream::NoEndpoint {
                service: service.hostname.clone(),
                port: destination.port(),
            };
            return (refused, None);
        }
        let lease = balancer.choose(&ready);
        (self.to_address(lease.endpoint()), Some(lease))
    }

    /// Through `waypoint` to `destination`, which the tunnel names as it was addressed; `None`
    /// when the source is one of the waypoint's own pods, which must not loop back to it.
    fn through_waypoint(
        &self,
        waypoint: &WaypointRef,
        source: IpAddr,
        destination: SocketAddr,
        balancer: &Arc<Balancer>,
    ) -> Option<(Upstream, Option<Lease>)> {
        let refuse = |reason| {
            let refused = Upstream::NoWaypoint {
                waypoint: waypoint.clone(),
                reason,
            };
            Some((refused, None))
        };
        let Some(service) = self.service(&waypoint.namespace, &waypoint.name) else {
            return refuse("no such Service");
        };
        if !service.is_waypoint {
            return refuse("the Service is no waypoint: it has no istio.io/waypoint-for label");
        }
        if service.endpoints.iter().any(|e| e.ip == source) {
            return None;
        }
        let ready: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter(|e| e.ready && self.workloads.contains_key(&e.ip))
            .map(|e| SocketAddr::new(e.ip, HBONE_PORT))
            .collect();
        if ready.is_empty() {
            return refuse("no ready endpoint");
        }
        let lease = balancer.choose(&ready);
        let Some(workload) = self.workloads.get(&lease.endpoint().ip()).cloned() else {
            return refuse("no ready endpoint");
        };
        let upstream = Upstream::Hbone {
            workload,
            hbone_addr: lease.endpoint(),
            authority: destination,
        };
        Some((upstream, Some(lease)))
    }

    fn to_address(&self, destination: SocketAddr) -> Upstream {
        match self.workloads.get(&destination.ip()) {
            Some(workload) if workload.protocol == Protocol::Hbone => Upstream::Hbone {
                workload: workload.clone(),
                hbone_addr: SocketAddr::new(destination.ip(), HBONE_PORT),
                authority: destination,
            },
            _ => Upstream::Passthrough { addr: destination },
        }
    }
}

/// The endpoint's port for a service port. An EndpointSlice names its ports after the Service's
/// ports (an unnamed one is `""`), with the target port already resolved for each endpoint.
fn endpoint_port(endpoint: &Endpoint, port: &ServicePort) -> Option<u16> {
    let resolved = endpoint.ports.get(port.name.as_deref().unwrap_or_default());
    match &port.target {
        TargetPort::Named(_) => resolved.copied(),
        TargetPort::Number(number) => Some(resolved.copied().unwrap_or(*number)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ip: &str, node: &str, protocol: Protocol) -> Workload {
        Workload {
            uid: WorkloadUid(format!("uid-{name}")),
            name: name.into(),
            workload_name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::new(),
            protocol,
            locality: Locality::default(),
            waypoint: None,
        }
    }

    fn state() -> ClusterState {
        let service = Service {
            name: "backend".into(),
            namespace: "shop".into(),
            hostname: "backend.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target: TargetPort::Named("http".into()),
                protocol: AppProtocol::Http1,
            }],
            endpoints: vec![
                Endpoint {
                    ip: "10.244.2.10".parse().unwrap(),
                    ready: true,
                    ports: [("http".to_owned(), 8080)].into(),
                    hostname: None,
                },
                Endpoint {
                    ip: "10.244.2.11".parse().unwrap(),
                    ready: false,
                    ports: [("http".to_owned(), 8080)].into(),
                    hostname: None,
                },
            ],
            waypoint: None,
            is_waypoint: false,
        };
        ClusterState::new(
            [
                workload("frontend", "10.244.1.10", "node1", Protocol::Hbone),
                workload("backend", "10.244.2.10", "node2", Protocol::Hbone),
                workload("legacy", "10.244.2.20", "node2", Protocol::Tcp),
            ],
            [service],
        )
    }

    /// Where `state` sends a connection from the frontend to `destination`.
    fn route(state: &ClusterState, destination: &str) -> Upstream {
        route_from(state, "10.244.1.10", destination)
    }

    fn route_from(state: &ClusterState, source: &str, destination: &str) -> Upstream {
        let balancer = Arc::new(Balancer::new(std::time::Duration::from_secs(30)));
        let (source, destination) = (source.parse().unwrap(), destination.parse().unwrap());
        state.resolve(source, destination, &balancer).0
    }

    fn waypoint() -> WaypointRef {
        WaypointRef {
            namespace: "shop".into(),
            name: "waypoint".into(),
        }
    }

    /// [`state`] with the backend Service behind `shop/waypoint`, whose pod is `10.244.3.10`,
    /// and with `pod_waypoint` as the backend pod's own.
    fn state_with_waypoint(
        pod_waypoint: Option<WaypointRef>,
        waypoint_listed: bool,
    ) -> ClusterState {
        let base = state();
        let mut backend = (**base
            .addressed_service("10.96.0.10:80".parse().unwrap())
            .unwrap())
        .clone();
        backend.waypoint = Some(waypoint());
        let mut services = vec![backend];
        if waypoint_listed {
            services.push(Service {
                name: "waypoint".into(),
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
                vips: vec!["10.96.0.20".parse().unwrap()],
                ports: vec![ServicePort {
                    name: Some("mesh".into()),
                    port: HBONE_PORT,
                    target: TargetPort::Number(HBONE_PORT),
                    protocol: AppProtocol::Tcp,
                }],
                endpoints: vec![Endpoint {
                    ip: "10.244.3.10".parse().unwrap(),
                    ready: true,
                    ports: BTreeMap::new(),
                    hostname: None,
                }],
                waypoint: None,
                is_waypoint: true,
            });
        }
        let mut backend_pod = workload("backend", "10.244.2.10", "node2", Protocol::Hbone);
        backend_pod.waypoint = pod_waypoint;
        ClusterState::new(
            [
                workload("frontend", "10.244.1.10", "node1", Protocol::Hbone),
                backend_pod,
                workload("waypoint", "10.244.3.10", "node3", Protocol::Tcp),
            ],
            services,
        )
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_it() {
        let state = state_with_waypoint(None, true);
        let Upstream::Hbone {
            workload,
            hbone_addr,
            authority,
        } = route(&state, "10.96.0.10:80")
        else {
            panic!("expected HBONE to the waypoint");
        };
        assert_eq!(workload.name, "waypoint");
        assert_eq!(hbone_addr, "10.244.3.10:15008".parse().unwrap());
        assert_eq!(authority, "10.96.0.10:80".parse().unwrap(), "as addressed");
        assert_eq!(
            state.waypoints_of("10.244.2.10".parse().unwrap()),
            [waypoint()],
            "the Service's waypoint fronts its endpoints"
        );

        // The Service's waypoint is for traffic to the Service: the pod itself is reached directly.
        let direct = route(&state, "10.244.2.10:8080");
        assert!(
            matches!(direct, Upstream::Hbone { ref workload, .. } if workload.name == "backend")
        );
        // The waypoint itself goes to the endpoints, not back to itself.
        let from_waypoint = route_from(&state, "10.244.3.10", "10.96.0.10:80");
        assert!(
            matches!(from_waypoint, Upstream::Hbone { ref workload, .. } if workload.name == "backend")
        );
    }

    #[test]
    fn a_pod_with_a_waypoint_is_reached_through_it() {
        let state = state_with_waypoint(Some(waypoint()), true);
        let Upstream::Hbone {
            workload,
            authority,
            ..
        } = route(&state, "10.244.2.10:8080")
        else {
            panic!("expected HBONE to the waypoint");
        };
        assert_eq!(workload.name, "waypoint");
        assert_eq!(authority, "10.244.2.10:8080".parse().unwrap());
    }

    #[test]
    fn a_missing_waypoint_refuses_rather_than_bypasses() {
        let state = state_with_waypoint(None, false);
        assert_eq!(
            route(&state, "10.96.0.10:80"),
            Upstream::NoWaypoint {
                waypoint: waypoint(),
                reason: "no such Service"
            }
        );
    }

    #[test]
    fn mesh_workloads_are_reached_through_hbone() {
        let Upstream::Hbone {
            workload,
            hbone_addr,
            authority,
        } = route(&state(), "10.244.2.10:8080")
        else {
            panic!("expected HBONE");
        };
        assert_eq!(workload.name, "backend");
        assert_eq!(hbone_addr, "10.244.2.10:15008".parse().unwrap());
        assert_eq!(authority, "10.244.2.10:8080".parse().unwrap());
    }

    #[test]
    fn everything_else_passes_through() {
        for destination in ["10.244.2.20:80", "192.0.2.1:443"] {
            assert_eq!(
                route(&state(), destination),
                Upstream::Passthrough {
                    addr: destination.parse().unwrap()
                }
            );
        }
    }

    #[test]
    fn service_vips_go_to_a_ready_endpoint_on_its_target_port() {
        for _ in 0..20 {
            let Upstream::Hbone { authority, .. } = route(&state(), "10.96.0.10:80") else {
                panic!("expected HBONE");
            };
            assert_eq!(authority, "10.244.2.10:8080".parse().unwrap());
        }
    }

    #[test]
    fn a_service_without_ready_endpoints_refuses() {
        let mut state = state();
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let mut service = (*state.services[&vip]).clone();
        service.endpoints.retain(|e| !e.ready);
        state.services.insert(vip, Arc::new(service));
        assert!(matches!(
            route(&state, "10.96.0.10:80"),
            Upstream::NoEndpoint { port: 80, .. }
        ));
    }

    #[test]
    fn endpoints_know_their_services() {
        let state = state();
        assert_eq!(
            state.services_of("10.244.2.10".parse().unwrap()),
            ["backend"]
        );
        assert!(state.services_of("10.244.1.10".parse().unwrap()).is_empty());
    }

    #[test]
    fn only_mesh_workloads_of_the_node_are_enrolled() {
        let state = state();
        let names = |node| {
            state
                .enrolled_on(node)
                .iter()
                .map(|w| w.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("node1"), ["frontend"]);
        assert_eq!(names("node2"), ["backend"]);
    }
}
