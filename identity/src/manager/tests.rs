use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::local_ca::LocalCa;
use crate::provider::IssueFuture;
use crate::spiffe::TrustDomain;

const TTL: Duration = Duration::from_secs(3600);

/// A local CA that counts requests, can be taken offline, and answers after a delay.
struct FlakyCa {
    ca: LocalCa,
    _dir: tempfile::TempDir,
    calls: AtomicUsize,
    offline: AtomicBool,
    delay: Duration,
}

impl FlakyCa {
    fn new(delay: Duration) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let trust_domain: TrustDomain = "cluster.local".parse().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain)
            .unwrap()
            .with_workload_ttl(TTL);
        Arc::new(Self {
            ca,
            _dir: dir,
            calls: AtomicUsize::new(0),
            offline: AtomicBool::new(false),
            delay,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CertificateProvider for FlakyCa {
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.offline.load(Ordering::SeqCst) {
                return Err(IssueError::Unreachable {
                    authority: "test".into(),
                    source: "connection refused".into(),
                });
            }
            self.ca.sign(identity)
        })
    }
}

fn identity(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// The lifetime the CA gives: the TTL plus its clock-skew allowance.
fn lifetime(manager_cert: &WorkloadCertificate) -> Duration {
    let lifetime = manager_cert.lifetime();
    assert!(lifetime >= TTL);
    lifetime
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_cost_one_ca_call() {
    let ca = FlakyCa::new(Duration::from_millis(500));
    let manager = Arc::new(CertificateManager::new(ca.clone()));
    let id = identity("web");
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (manager, id) = (manager.clone(), id.clone());
            tokio::spawn(async move { manager.fetch(&id).await.unwrap() })
        })
        .collect();
    let mut certs = Vec::new();
    for request in requests {
        certs.push(request.await.unwrap());
    }
    assert_eq!(ca.calls(), 1);
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life() {
    let ca = FlakyCa::new(Duration::ZERO);
    let manager = CertificateManager::new(ca.clone());
    let id = identity("web");
    let first = manager.fetch(&id).await.unwrap();
    let lifetime = lifetime(&first);
    let until_half_life = lifetime / 2
        - SystemTime::now()
            .duration_since(first.not_before())
            .unwrap();

    // Renewal comes at most RENEWAL_JITTER of the lifetime before half-life.
    tokio::time::sleep(until_half_life - lifetime.mul_f64(RENEWAL_JITTER + 0.01)).await;
    assert_eq!(ca.calls(), 1, "renewed too early");
    assert!(Arc::ptr_eq(&manager.fetch(&id).await.unwrap(), &first));

    tokio::time::sleep(lifetime.mul_f64(RENEWAL_JITTER + 0.02)).await;
    assert_eq!(ca.calls(), 2, "not renewed by half-life");
    let second = manager.fetch(&id).await.unwrap();
    assert_ne!(second.serial(), first.serial());
}

#[tokio::test(start_paused = true)]
async fn serves_the_current_certificate_through_a_ca_outage_until_it_expires() {
    let ca = FlakyCa::new(Duration::ZERO);
    let manager = CertificateManager::new(ca.clone());
    let id = identity("web");
    let first = manager.fetch(&id).await.unwrap();
    let lifetime = lifetime(&first);
    ca.offline.store(true, Ordering::SeqCst);

    tokio::time::sleep(lifetime.mul_f64(0.75)).await;
    assert!(ca.calls() > 2, "renewal was retried");
    let during_outage = manager.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&during_outage, &first));

    tokio::time::sleep(lifetime.mul_f64(0.26)).await;
    let err = manager.fetch(&id).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Unavailable { source, .. }
            if matches!(**source, IssueError::Unreachable { .. })),
        "{err:?}"
    );

    ca.offline.store(false, Ordering::SeqCst);
    tokio::time::sleep(RETRY_BACKOFF.1).await;
    let recovered = manager.fetch(&id).await.unwrap();
    assert_ne!(recovered.serial(), first.serial());
}

#[tokio::test(start_paused = true)]
async fn first_request_fails_fast_while_the_ca_is_down() {
    let ca = FlakyCa::new(Duration::ZERO);
    ca.offline.store(true, Ordering::SeqCst);
    let manager = CertificateManager::new(ca.clone());
    let err = manager.fetch(&identity("web")).await.unwrap_err();
    assert!(matches!(err, FetchError::Unavailable { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_hangs_times_out() {
    let ca = FlakyCa::new(ISSUE_TIMEOUT * 2);
    let manager = CertificateManager::new(ca.clone());
    let err = manager.fetch(&identity("web")).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Unavailable { source, .. }
            if matches!(**source, IssueError::Timeout)),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn refuses_a_certificate_for_another_identity() {
    struct WrongIdentity(Arc<FlakyCa>);
    impl CertificateProvider for WrongIdentity {
        fn issue<'a>(&'a self, _: &'a Identity) -> IssueFuture<'a> {
            Box::pin(async move { self.0.ca.sign(&identity("other")) })
        }
    }
    let manager = CertificateManager::new(Arc::new(WrongIdentity(FlakyCa::new(Duration::ZERO))));
    let err = manager.fetch(&identity("web")).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Unavailable { source, .. }
            if matches!(**source, IssueError::IdentityMismatch { .. })),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn released_identities_stop_renewing() {
    let ca = FlakyCa::new(Duration::ZERO);
    let manager = CertificateManager::new(ca.clone());
    let id = identity("web");
    let cert = manager.fetch(&id).await.unwrap();
    assert_eq!(manager.identities(), vec![id.clone()]);

    manager.release(&id);
    assert!(manager.identities().is_empty());
    tokio::time::sleep(lifetime(&cert)).await;
    assert_eq!(ca.calls(), 1);
}
