use std::net::SocketAddr;

use ambit_identity::Identity;

use crate::authorize::{self, DenyReason, InboundRequest, Verdict};
use crate::source::file::parse;
use crate::state::{ClusterState, WaypointRef};

/// `shop` labelled to use the waypoint `shop/waypoint` (for services, unless `waypoint_for`
/// says otherwise), whose pod runs as `waypoint`; `web` behind the Service `web`, `db` opted
/// out, and `reports` naming another waypoint in `ops`.
fn cluster(waypoint_for: &str, extra: &str) -> ClusterState {
    let text = format!(
        "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: shop
  labels: {{istio.io/waypoint-for: {waypoint_for}}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: mesh, port: 15008}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: waypoint-1
  namespace: shop
  labels: {{kubernetes.io/service-name: waypoint}}
addressType: IPv4
endpoints: [{{addresses: [10.244.1.50]}}]
ports: [{{name: mesh, port: 15008}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-5d9c7
  namespace: shop
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {{nodeName: node1, serviceAccountName: waypoint, containers: [{{name: waypoint}}]}}
status: {{podIP: 10.244.1.50}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node2, serviceAccountName: web, containers: [{{name: app}}]}}
status: {{podIP: 10.244.2.10}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{{addresses: [10.244.2.10]}}]
ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
  labels: {{istio.io/use-waypoint: none}}
spec: {{clusterIP: 10.96.0.11, ports: [{{port: 5432}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: reports
  namespace: shop
  labels: {{istio.io/use-waypoint: audit, istio.io/use-waypoint-namespace: ops}}
spec: {{clusterIP: 10.96.0.12, ports: [{{port: 80}}]}}
{extra}"
    );
    parse(&text, "istio-system").unwrap()
}

fn waypoint(namespace: &str, name: &str) -> Option<WaypointRef> {
    Some(WaypointRef {
        namespace: namespace.into(),
        name: name.into(),
    })
}

fn service_waypoint(state: &ClusterState, name: &str) -> Option<WaypointRef> {
    state.service("shop", name).unwrap().waypoint.clone()
}

fn pod_waypoint(state: &ClusterState, ip: &str) -> Option<WaypointRef> {
    state
        .workload_by_ip(ip.parse().unwrap())
        .unwrap()
        .waypoint
        .clone()
}

#[test]
fn services_take_their_own_label_else_their_namespace() {
    let state = cluster("service", "");
    assert_eq!(
        service_waypoint(&state, "web"),
        waypoint("shop", "waypoint")
    );
    assert_eq!(service_waypoint(&state, "db"), None, "opted out");
    assert_eq!(
        service_waypoint(&state, "reports"),
        waypoint("ops", "audit"),
        "its own label, to another namespace, even to a waypoint not there yet"
    );
    assert_eq!(
        service_waypoint(&state, "waypoint"),
        None,
        "a waypoint is not behind itself"
    );
}

#[test]
fn pods_take_a_waypoint_only_for_workload_traffic() {
    let state = cluster("service", "");
    assert_eq!(pod_waypoint(&state, "10.244.2.10"), None);
    let state = cluster("all", "");
    assert_eq!(
        pod_waypoint(&state, "10.244.2.10"),
        waypoint("shop", "waypoint")
    );
    assert_eq!(
        pod_waypoint(&state, "10.244.1.50"),
        None,
        "the waypoint's own pod"
    );
}

/// What the destination `web` decides for a connection from `source`.
fn decide(state: &ClusterState, source: &str) -> Verdict {
    let web = state
        .workload_by_ip("10.244.2.10".parse().unwrap())
        .unwrap();
    let identity: Identity = format!("spiffe://cluster.local/ns/{source}")
        .parse()
        .unwrap();
    let request = InboundRequest {
        source_ip: "10.244.1.10".parse().unwrap(),
        source_identity: Some(identity),
        destination: SocketAddr::new("10.244.2.10".parse().unwrap(), 8080),
    };
    authorize::evaluate(state, web, &request).0
}

#[test]
fn workloads_behind_a_waypoint_admit_it_and_refuse_the_way_around() {
    let state = cluster("service", "");
    assert!(
        state
            .authorization()
            .iter()
            .any(|p| p.name.to_string() == "istio-system/istio_allow_waypoint_shop_waypoint")
    );
    assert_eq!(decide(&state, "shop/sa/waypoint"), Verdict::Allow);
    assert_eq!(
        decide(&state, "shop/sa/client"),
        Verdict::Deny {
            policy: None,
            reason: DenyReason::AroundWaypoint
        }
    );

    // The workload's own ALLOW policies may admit clients directly, as in Istio.
    let direct = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: direct, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
";
    let state = cluster("service", direct);
    assert_eq!(decide(&state, "shop/sa/client"), Verdict::Allow);
    assert_eq!(decide(&state, "shop/sa/waypoint"), Verdict::Allow);
    assert!(matches!(
        decide(&state, "shop/sa/other"),
        Verdict::Deny {
            reason: DenyReason::AroundWaypoint,
            ..
        }
    ));
}

#[test]
fn a_waypoint_not_there_keeps_what_is_bound_to_it() {
    let ghost_namespace = "---
apiVersion: v1
kind: Namespace
metadata:
  name: ops
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ghost}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: ops}
spec: {nodeName: node2, serviceAccountName: tool, containers: [{name: app}]}
status: {podIP: 10.244.2.30}
";
    let state = cluster("service", ghost_namespace);
    assert_eq!(
        pod_waypoint(&state, "10.244.2.30"),
        waypoint("ops", "ghost"),
        "refused until the waypoint appears, rather than reached around it"
    );
    // Nobody is admitted behind a waypoint that has no pods.
    let tool = state
        .workload_by_ip("10.244.2.30".parse().unwrap())
        .unwrap();
    let request = InboundRequest {
        source_ip: "10.244.1.10".parse().unwrap(),
        source_identity: Some("spiffe://cluster.local/ns/ops/sa/ghost".parse().unwrap()),
        destination: SocketAddr::new("10.244.2.30".parse().unwrap(), 8080),
    };
    assert!(matches!(
        authorize::evaluate(&state, tool, &request).0,
        Verdict::Deny { .. }
    ));
}

#[test]
fn a_broken_policy_on_a_waypoint_is_enforced_by_the_waypoint() {
    let broken = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin/{**}']}}]}]
";
    let state = cluster("service", broken);
    assert_eq!(
        state.rejected_policies().len(),
        1,
        "{:?}",
        state.rejected_policies()
    );
    let policy = state
        .authorization()
        .iter()
        .find(|p| p.name.name == "no-admin")
        .unwrap();
    assert_eq!(
        policy.scope,
        crate::policy::Scope::Gateways(vec!["waypoint".to_owned()]),
        "the stand-in keeps the policy's targets, rather than the namespace's workloads"
    );
    assert_eq!(
        decide(&state, "shop/sa/waypoint"),
        Verdict::Allow,
        "the endpoints are not its to deny"
    );
}
