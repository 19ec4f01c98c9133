//! Keeps one valid certificate per identity the node acts for.
//!
//! Each identity has a renewal task: it obtains the first certificate, renews it at half-life
//! (a little earlier, at random, so that a node's certificates do not all renew at once), and
//! retries with backoff while the CA is unreachable. Callers read the latest result from a
//! watch channel, so concurrent requests for one identity cost one CA call, and a certificate
//! that is still valid keeps being served through a CA outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::certificate::WorkloadCertificate;
use crate::provider::{CertificateProvider, IssueError};
use crate::spiffe::Identity;

/// How long the CA may take to answer one request.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delays after a failed request: doubling from the first to the last.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Renewal happens up to this fraction of the lifetime before half-life.
const RENEWAL_JITTER: f64 = 0.05;

/// Why no valid certificate can be handed out.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no valid certificate for {identity}")]
    Unavailable {
        identity: Identity,
        #[source]
        source: Arc<IssueError>,
    },
    #[error("the certificate of {identity} was released while it was requested")]
    Released { identity: Identity },
}

/// The certificate held for one identity.
#[derive(Debug, Clone)]
pub struct CertificateStatus {
    pub identity: Identity,
    /// `None` until the first one is issued, and once it expired.
    pub certificate: Option<Arc<WorkloadCertificate>>,
    /// Why the latest request failed, if it did.
    pub error: Option<Arc<IssueError>>,
}

/// How many certificate requests this manager made, by outcome, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub issued: u64,
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    issued: AtomicU64,
    failed: AtomicU64,
}

/// Obtains, caches and renews workload certificates from a [`CertificateProvider`].
pub struct CertificateManager {
    provider: Arc<dyn CertificateProvider>,
    entries: Mutex<HashMap<Identity, Entry>>,
    counters: Arc<Counters>,
}

/// What callers see of one identity's renewal task.
#[derive(Clone, Default)]
struct State {
    current: Option<Current>,
    /// The outcome of the latest request, when it failed.
    last_error: Option<Arc<IssueError>>,
}

#[derive(Clone)]
struct Current {
    certificate: Arc<WorkloadCertificate>,
    expires_at: Instant,
}

struct Entry {
    state: watch::Receiver<State>,
    renewal: AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl CertificateManager {
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Self {
        Self {
            provider,
            entries: Mutex::default(),
            counters: Arc::default(),
        }
    }

    /// The requests made to the provider so far: first certificates, renewals and retries.
    pub fn requests(&self) -> RequestCounts {
        RequestCounts {
            issued: self.counters.issued.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// A valid certificate for `identity`, waiting for the first one if need be. From the first
    /// call on, the certificate is kept renewed until [`release`](Self::release).
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, FetchError> {
        let mut state = self.subscribe(identity);
        loop {
            {
                let state = state.borrow_and_update();
                if let Some(current) = &state.current
                    && Instant::now() < current.expires_at
                {
                    return Ok(current.certificate.clone());
                }
                if let Some(error) = &state.last_error {
                    return Err(FetchError::Unavailable {
                        identity: identity.clone(),
                        source: error.clone(),
                    });
                }
            }
            if state.changed().await.is_err() {
                return Err(FetchError::Released {
                    identity: identity.clone(),
                });
            }
        }
    }

    /// Stops renewing the certificate of `identity` and forgets it: the node no longer runs a
    /// workload with that identity.
    pub fn release(&self, identity: &Identity) {
        self.lock().remove(identity);
    }

    /// The identities whose certificates are kept renewed.
    pub fn identities(&self) -> Vec<Identity> {
        self.lock().keys().cloned().collect()
    }

    /// What is held for each identity, sorted by identity: the current certificate (until it
    /// expires) and the last renewal error.
    pub fn status(&self) -> Vec<CertificateStatus> {
        let mut status: Vec<CertificateStatus> = self
            .lock()
            .iter()
            .map(|(identity, entry)| {
                let state = entry.state.borrow();
                CertificateStatus {
                    identity: identity.clone(),
                    certificate: state
                        .current
                        .as_ref()
                        .filter(|current| Instant::now() < current.expires_at)
                        .map(|current| current.certificate.clone()),
                    error: state.last_error.clone(),
                }
            })
            .collect();
        status.sort_by(|a, b| a.identity.cmp(&b.identity));
        status
    }

    fn subscribe(&self, identity: &Identity) -> watch::Receiver<State> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get(identity) {
            return entry.state.clone();
        }
        let (sender, state) = watch::channel(State::default());
        let renewal = tokio::spawn(renew(
            self.provider.clone(),
            self.counters.clone(),
            identity.clone(),
            sender,
        ));
        entries.insert(
            identity.clone(),
            Entry {
                state: state.clone(),
                renewal: renewal.abort_handle(),
            },
        );
        state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

/// The renewal task of one identity; runs until its entry is dropped.
async fn renew(
    provider: Arc<dyn CertificateProvider>,
    counters: Arc<Counters>,
    identity: Identity,
    state: watch::Sender<State>,
) {
    let mut backoff = RETRY_BACKOFF.0;
    loop {
        match issue(provider.as_ref(), &identity).await {
            Ok(certificate) => {
                counters.issued.fetch_add(1, Ordering::Relaxed);
                let (expires_at, renew_at) = schedule(&certificate, SystemTime::now());
                tracing::info!(
                    %identity,
                    serial = certificate.serial(),
                    expires_in_s = expires_at.saturating_duration_since(Instant::now()).as_secs(),
                    "certificate issued"
                );
                state.send_replace(State {
                    current: Some(Current {
                        certificate: Arc::new(certificate),
                        expires_at,
                    }),
                    last_error: None,
                });
                backoff = RETRY_BACKOFF.0;
                tokio::time::sleep_until(renew_at).await;
            }
            Err(error) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%identity, error = %error, retry_in_s = backoff.as_secs(), "certificate request failed");
                state.send_modify(|state| state.last_error = Some(Arc::new(error)));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF.1);
            }
        }
    }
}

async fn issue(
    provider: &dyn CertificateProvider,
    identity: &Identity,
) -> Result<WorkloadCertificate, IssueError> {
    let certificate = tokio::time::timeout(ISSUE_TIMEOUT, provider.issue(identity))
        .await
        .map_err(|_| IssueError::Timeout)??;
    if certificate.identity() != identity {
        return Err(IssueError::IdentityMismatch {
            requested: identity.clone(),
            issued: certificate.identity().clone(),
        });
    }
    Ok(certificate)
}

/// When `certificate` stops being valid and when to renew it, on the runtime's clock.
fn schedule(certificate: &WorkloadCertificate, now: SystemTime) -> (Instant, Instant) {
    let start = Instant::now();
    let lifetime = certificate.lifetime();
    let elapsed = now
        .duration_since(certificate.not_before())
        .unwrap_or_default();
    let remaining = certificate
        .not_after()
        .duration_since(now)
        .unwrap_or_default();
    let jitter = lifetime.mul_f64(RENEWAL_JITTER * fastrand::f64());
    // Never sooner than the first retry delay, so a short-lived certificate cannot make the
    // task hammer the CA.
    let renew_in = (lifetime / 2)
        .saturating_sub(elapsed)
        .saturating_sub(jitter)
        .max(RETRY_BACKOFF.0);
    (start + remaining, start + renew_in)
}

#[cfg(test)]
mod tests;
