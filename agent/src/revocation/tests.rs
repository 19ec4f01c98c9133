use std::time::Duration;

use super::*;
use crate::authorize::DenyReason;
use crate::source::file::parse;
use crate::state::{LocalWorkload, WorkloadUid};
use crate::telemetry::Telemetry;

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, uid: db-uid, labels: {app: db}}
spec: {nodeName: node1, serviceAccountName: db, containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: web-uid, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {podIP: 10.0.0.1}
";

const DENY_WEB: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.0.0.1/32]}}]}]
";

fn state(extra: &str) -> Arc<ClusterState> {
    Arc::new(parse(&format!("{CLUSTER}{extra}"), "istio-system").unwrap())
}

fn db_policy() -> Arc<WorkloadPolicy> {
    Arc::new(WorkloadPolicy {
        workload: LocalWorkload {
            uid: WorkloadUid("db-uid".into()),
            ip: "10.0.0.2".parse().unwrap(),
        },
        telemetry: Arc::new(Telemetry::default()),
    })
}

fn from_web() -> InboundRequest {
    InboundRequest {
        source_ip: "10.0.0.1".parse().unwrap(),
        source_identity: None,
        destination: "10.0.0.2:5432".parse().unwrap(),
    }
}

/// Polls `future` once: whether it has resolved.
fn resolved(future: &mut RevokedFuture) -> Option<Verdict> {
    let waker = std::task::Waker::noop();
    match future
        .as_mut()
        .poll(&mut std::task::Context::from_waker(waker))
    {
        std::task::Poll::Ready(verdict) => Some(verdict),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn only_connections_a_change_denies_are_revoked() {
    let revocations = Arc::new(Revocations::default());
    let (states, receiver) = watch::channel(state(""));
    tokio::spawn(revocations.clone().run(receiver));
    let mut revoked = revocations.watch(db_policy(), from_web(), &states.subscribe());
    let mut other = revocations.watch(
        db_policy(),
        InboundRequest {
            source_ip: "10.0.0.9".parse().unwrap(),
            ..from_web()
        },
        &states.subscribe(),
    );

    // A change that keeps the connection allowed does not touch it.
    states.send_replace(state(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: more}\n",
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(resolved(&mut revoked), None);

    states.send_replace(state(DENY_WEB));
    let verdict = tokio::time::timeout(Duration::from_secs(5), &mut revoked)
        .await
        .expect("revoked");
    assert_eq!(
        verdict,
        Verdict::Deny {
            policy: Some("shop/no-web".into()),
            reason: DenyReason::Authorization
        }
    );
    assert_eq!(
        resolved(&mut other),
        None,
        "another source is still allowed"
    );
    assert_eq!(
        revocations.lock().len(),
        1,
        "the revoked connection is forgotten"
    );
    drop(other);
    assert!(
        revocations.lock().is_empty(),
        "an ended connection is forgotten"
    );
}

#[tokio::test]
async fn a_destination_that_left_the_cluster_is_revoked() {
    let revocations = Arc::new(Revocations::default());
    let (states, receiver) = watch::channel(state(""));
    tokio::spawn(revocations.clone().run(receiver));
    let revoked = revocations.watch(db_policy(), from_web(), &states.subscribe());
    let without_db = CLUSTER.replace("uid: db-uid", "uid: db-replaced");
    states.send_replace(Arc::new(parse(&without_db, "istio-system").unwrap()));
    let verdict = tokio::time::timeout(Duration::from_secs(5), revoked)
        .await
        .expect("revoked");
    assert!(matches!(
        verdict,
        Verdict::Deny {
            reason: DenyReason::UnknownDestination,
            ..
        }
    ));
}

#[tokio::test]
async fn a_change_before_the_registration_is_not_missed() {
    let revocations = Arc::new(Revocations::default());
    // Authorized against the first state; the denying one is published, and handled, before
    // the connection registers.
    let (states, _receiver) = watch::channel(state(DENY_WEB));
    let revoked = revocations.watch(db_policy(), from_web(), &states.subscribe());
    let verdict = tokio::time::timeout(Duration::from_secs(5), revoked)
        .await
        .expect("revoked at once");
    assert!(matches!(verdict, Verdict::Deny { .. }));
    assert!(revocations.lock().is_empty());
}

#[tokio::test]
async fn a_label_change_that_a_policy_selects_revokes() {
    let revocations = Arc::new(Revocations::default());
    let deny_locked = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: locked, namespace: shop}
spec:
  selector: {matchLabels: {locked: 'yes'}}
  action: DENY
  rules: [{}]
";
    let (states, receiver) = watch::channel(state(deny_locked));
    tokio::spawn(revocations.clone().run(receiver));
    let mut revoked = revocations.watch(db_policy(), from_web(), &states.subscribe());
    // A change elsewhere first, so that the next one is told apart from it.
    let elsewhere = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: more}\n";
    states.send_replace(state(&format!("{deny_locked}{elsewhere}")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(resolved(&mut revoked), None);

    // Same policies; the destination's labels now match the DENY.
    let locked = CLUSTER.replace("{app: db}", "{app: db, locked: 'yes'}");
    let text = format!("{locked}{deny_locked}");
    states.send_replace(Arc::new(parse(&text, "istio-system").unwrap()));
    let verdict = tokio::time::timeout(Duration::from_secs(5), revoked)
        .await
        .expect("revoked");
    assert!(matches!(
        verdict,
        Verdict::Deny {
            policy: Some(_),
            ..
        }
    ));
}
