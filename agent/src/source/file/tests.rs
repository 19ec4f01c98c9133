use super::*;
use crate::balance::Balancer;
use crate::state::{Locality, Protocol, Upstream, WorkloadUid};

const ROOT: &str = "istio-system";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: frontend
  namespace: shop
  uid: 7f1c
  labels: {app: frontend}
spec:
  nodeName: node1
  serviceAccountName: frontend
  containers: [{name: app, image: app}]
status:
  podIP: 10.244.1.10
---
apiVersion: v1
kind: Pod
metadata:
  name: debug
  namespace: shop
  labels: {istio.io/dataplane-mode: none}
spec:
  nodeName: node1
  containers: [{name: app, image: app}]
status:
  podIPs: [{ip: 10.244.1.11}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: legacy}
spec:
  nodeName: node2
  containers: [{name: app, image: app}]
status:
  podIP: 10.244.2.20
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec:
  containers: [{name: app, image: app}]
---
apiVersion: v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: frontend-abc
  namespace: shop
  labels: {kubernetes.io/service-name: frontend}
addressType: IPv4
endpoints: [{addresses: [10.244.1.10], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: later, namespace: shop}
"#;

#[test]
fn translates_pods_namespaces_and_services() {
    let state = parse(CLUSTER, ROOT).unwrap();
    let frontend = state
        .workload_by_ip("10.244.1.10".parse().unwrap())
        .unwrap();
    assert_eq!(frontend.uid, WorkloadUid("7f1c".into()));
    assert_eq!(frontend.service_account, "frontend");
    assert_eq!(frontend.protocol, Protocol::Hbone);

    let debug = state
        .workload_by_ip("10.244.1.11".parse().unwrap())
        .unwrap();
    assert_eq!(debug.protocol, Protocol::Tcp, "opted out");
    assert_eq!(debug.service_account, "default");
    let db = state
        .workload_by_ip("10.244.2.20".parse().unwrap())
        .unwrap();
    assert_eq!(db.protocol, Protocol::Tcp, "namespace not enrolled");
    assert_eq!(state.workloads().len(), 3, "the pending pod has no IP yet");

    let enrolled: Vec<_> = state
        .enrolled_on("node1")
        .iter()
        .map(|w| w.name.clone())
        .collect();
    assert_eq!(enrolled, ["frontend"]);

    let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
    let (Upstream::Hbone { authority, .. }, _) = state.resolve(
        "10.244.1.99".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
        &balancer,
    ) else {
        panic!("the service leads to the enrolled frontend");
    };
    assert_eq!(authority, "10.244.1.10:8080".parse().unwrap());
}

#[test]
fn workloads_are_where_their_nodes_are() {
    let nodes = "
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: {topology.kubernetes.io/region: eu-west-1, topology.kubernetes.io/zone: eu-west-1a}
---
apiVersion: v1
kind: Node
metadata: {name: node2, labels: {topology.kubernetes.io/zone: ''}}
";
    let state = parse(&format!("{CLUSTER}{nodes}"), ROOT).unwrap();
    let locality = |ip: &str| {
        state
            .workload_by_ip(ip.parse().unwrap())
            .unwrap()
            .locality
            .clone()
    };
    assert_eq!(
        locality("10.244.1.10"),
        Locality {
            region: Some("eu-west-1".into()),
            zone: Some("eu-west-1a".into()),
        }
    );
    assert_eq!(
        locality("10.244.2.20"),
        Locality::default(),
        "an empty label is no zone"
    );
}

#[test]
fn workloads_are_named_after_their_controller() {
    let owned = |kind: &str, owner: &str| {
        CLUSTER.replace(
            "  uid: 7f1c\n",
            &format!(
                "  uid: 7f1c\n  labels: {{app: frontend, pod-template-hash: 5d8f9c}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: {kind}, name: {owner}, uid: o1, controller: true}}]\n"
            ),
        ).replace("  labels: {app: frontend}\n", "")
    };
    let name = |text: &str| {
        let state = parse(text, ROOT).unwrap();
        let frontend = state
            .workload_by_ip("10.244.1.10".parse().unwrap())
            .unwrap();
        (frontend.name.clone(), frontend.workload_name.clone())
    };
    assert_eq!(name(CLUSTER), ("frontend".into(), "frontend".into()));
    assert_eq!(
        name(&owned("ReplicaSet", "frontend-5d8f9c")),
        ("frontend".into(), "frontend".into()),
        "a Deployment's pod is named after the Deployment"
    );
    assert_eq!(
        name(&owned("StatefulSet", "store")),
        ("frontend".into(), "store".into())
    );
}

#[test]
fn host_network_pods_are_never_enrolled() {
    let text = CLUSTER.replace(
        "  serviceAccountName: frontend\n",
        "  serviceAccountName: frontend\n  hostNetwork: true\n",
    );
    let state = parse(&text, ROOT).unwrap();
    assert!(state.enrolled_on("node1").is_empty());
}

#[test]
fn enrolment_follows_istio_labels_and_pod_phases() {
    let frontend = "10.244.1.10".parse().unwrap();
    let protocol = |text: &str| {
        let state = parse(text, ROOT).unwrap();
        state.workload_by_ip(frontend).map(|w| w.protocol)
    };
    assert_eq!(protocol(CLUSTER), Some(Protocol::Hbone));
    // A pod opts itself in, in a namespace outside the mesh.
    let legacy = CLUSTER.replace(
        "  name: frontend\n  namespace: shop\n",
        "  name: frontend\n  namespace: legacy\n",
    );
    assert_eq!(protocol(&legacy), Some(Protocol::Tcp));
    let opted_in = legacy.replace(
        "labels: {app: frontend}",
        "labels: {app: frontend, istio.io/dataplane-mode: ambient}",
    );
    assert_eq!(protocol(&opted_in), Some(Protocol::Hbone));
    // A pod with an Istio sidecar proxies for itself.
    let sidecar = CLUSTER.replace(
        "  labels: {app: frontend}\n",
        "  labels: {app: frontend}\n  annotations: {sidecar.istio.io/status: '{}'}\n",
    );
    assert_eq!(protocol(&sidecar), Some(Protocol::Tcp));
    // A pod that ran to completion is gone: its IP may be another pod's already.
    for phase in ["Succeeded", "Failed"] {
        let done = CLUSTER.replace(
            "  podIP: 10.244.1.10\n",
            &format!("  phase: {phase}\n  podIP: 10.244.1.10\n"),
        );
        assert_eq!(protocol(&done), None, "{phase}");
    }
}

#[test]
fn named_target_ports_are_found_under_the_service_port_name() {
    // The EndpointSlice names its ports after the Service's ports, with the target resolved.
    let text = CLUSTER
        .replace(
            "ports: [{name: http, port: 80, targetPort: 8080}]",
            "ports: [{name: web, port: 80, targetPort: http}]",
        )
        .replace(
            "ports: [{name: http, port: 8080}]",
            "ports: [{name: web, port: 8080}]",
        );
    let state = parse(&text, ROOT).unwrap();
    let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
    let (Upstream::Hbone { authority, .. }, _) = state.resolve(
        "10.244.1.99".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
        &balancer,
    ) else {
        panic!("not through HBONE");
    };
    assert_eq!(authority, "10.244.1.10:8080".parse().unwrap());
}

#[test]
fn errors_name_the_document_and_the_field() {
    let bad_ip = CLUSTER.replace("podIP: 10.244.1.10", "podIP: 10.244.1.300");
    let err = parse(&bad_ip, ROOT).unwrap_err().to_string();
    assert_eq!(
        err,
        "document 3 (Pod shop/frontend): field `status.podIP`: \"10.244.1.300\" is not an IP address"
    );

    let bad_type = CLUSTER.replace(
        "  nodeName: node1\n  serviceAccountName",
        "  nodeName: [node1]\n  serviceAccountName",
    );
    let err = parse(&bad_type, ROOT).unwrap_err().to_string();
    assert!(
        err.starts_with("document 3 (Pod shop/frontend): field `spec.nodeName`: invalid type"),
        "{err}"
    );

    let bad_port = CLUSTER.replace("port: 80, targetPort", "port: 80000, targetPort");
    let err = parse(&bad_port, ROOT).unwrap_err().to_string();
    assert!(
        err.contains("(Service shop/frontend): field `spec.ports[0].port`"),
        "{err}"
    );

    let err = parse("metadata: {name: x}\n", ROOT)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "document 1 (? ?/x): field `kind`: missing");

    let err = parse("kind: Pod\nmetadata: [\n", ROOT)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("document 1: not valid YAML"), "{err}");
}

#[tokio::test]
async fn a_bad_edit_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, CLUSTER).unwrap();
    let source = FileSource::new(&path, ROOT);
    let (states, mut updates) = watch::channel(Arc::new(source.load().unwrap()));
    let (trigger, watcher) = crate::drain::channel();
    tokio::spawn(source.watch(states, watcher));

    std::fs::write(&path, CLUSTER.replace("10.244.1.10", "not-an-ip")).unwrap();
    tokio::time::sleep(POLL_INTERVAL * 3).await;
    assert!(
        !updates.has_changed().unwrap(),
        "a broken file must not replace the state"
    );

    std::fs::write(&path, CLUSTER.replace("10.244.1.10", "10.244.1.12")).unwrap();
    updates.changed().await.unwrap();
    let state = updates.borrow_and_update().clone();
    assert!(
        state
            .workload_by_ip("10.244.1.12".parse().unwrap())
            .is_some()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), trigger.drain()).await;
}

#[test]
fn a_bad_policy_is_replaced_by_a_denial_and_the_rest_keeps_working() {
    let text = format!(
        "{CLUSTER}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: typo, namespace: legacy}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  rules: [{{from: [{{source: {{principal: [x]}}}}]}}]\n"
    );
    let state = parse(&text, ROOT).unwrap();
    assert_eq!(state.workloads().len(), 3);
    let rejected = state.rejected_policies();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].starts_with("document 10 (AuthorizationPolicy legacy/typo): field `spec.rules[0].from[0].source.principal`: unknown field `principal`"),
        "{rejected:?}"
    );
    let db = state
        .workload_by_ip("10.244.2.20".parse().unwrap())
        .unwrap();
    let connection = crate::policy::Connection {
        source_ip: "10.244.1.10".parse().unwrap(),
        source_identity: None,
        destination_ip: "10.244.2.20".parse().unwrap(),
        destination_port: 5432,
        destination_namespace: &db.namespace,
        destination_labels: &[("app".to_owned(), "db".to_owned())].into(),
        destination_services: &[],
        destination_waypoints: &[],
        request: None,
    };
    let decision = state.authorization().decide(&connection);
    assert!(!decision.allowed, "the stand-in denies the policy's scope");
    assert_eq!(decision.policy.unwrap().to_string(), "legacy/typo");
}

#[test]
fn objects_read_as_the_api_server_serves_them() {
    // Port keys as JSON strings, and a field from a newer Kubernetes on a core object.
    let text = format!(
        "{CLUSTER}---\n{}\n---\n{}\n",
        r#"{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "frontend"}}, "mtls": {"mode": "STRICT"},
                     "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}}"#,
        r#"{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "new", "namespace": "shop", "uid": "9a9a"},
            "spec": {"nodeName": "node1", "containers": [{"name": "app"}], "fieldOfTomorrow": 1},
            "status": {"podIP": "10.244.1.30", "anotherNewField": {"x": 1}}}"#,
    );
    let state = parse(&text, ROOT).unwrap();
    assert!(
        state.rejected_policies().is_empty(),
        "{:?}",
        state.rejected_policies()
    );
    let frontend = state
        .workload_by_ip("10.244.1.10".parse().unwrap())
        .unwrap()
        .clone();
    let peers = state.peer_authentication();
    let mode = |port| peers.decide(&frontend.namespace, &frontend.labels, port).0;
    assert_eq!(mode(9090), crate::policy::MtlsMode::Permissive);
    assert_eq!(mode(8080), crate::policy::MtlsMode::Strict);
    assert!(
        state
            .workload_by_ip("10.244.1.30".parse().unwrap())
            .is_some()
    );
}
