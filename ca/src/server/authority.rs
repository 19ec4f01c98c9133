//! The CA the server signs with, and the serving certificate it issued, swapped together when
//! the CA directory changes.
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink, so the files change
//! together but are read one by one: a read that straddles a swap sees a mix, whose key does
//! not fit its certificate or which differs from the next read. The CA is loaded from the very
//! bytes that were compared, never read again. A CA that fails to load, or whose certificates
//! do not verify against its roots, is logged and counted, the previous one kept, and the load
//! tried again at each poll until it succeeds: a failure may be passing (a certificate not yet
//! valid by this clock, a file descriptor short).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use ambit_identity::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CaDirContents, LocalCa, LocalCaError,
    ROOT_CERT_FILE, TrustDomain, certificate_not_after,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::metrics::Metrics;
use super::refusal::WithCauses;
use super::tls::{ServingCertificate, ServingError, ServingName, issue_serving_certificate};
use crate::pem::certificate_pem;

pub(super) const CA_FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE];

/// Why the CA could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadCaError {
    #[error(
        "the CA directory {} holds no CA: mount Istio's cacerts there ({CA_FILES:?}), or pass --create-root to create a self-signed root",
        .0.display()
    )]
    Empty(PathBuf),
    #[error("failed to load the CA")]
    Load(#[source] LocalCaError),
    #[error("the CA cannot certify the server")]
    Serving(#[source] ServingError),
}

/// The current CA and serving certificate.
pub(crate) struct Authority {
    dir: PathBuf,
    server_names: Vec<ServingName>,
    provider: Arc<CryptoProvider>,
    metrics: Metrics,
    current: RwLock<Arc<Generation>>,
    /// What the current CA was loaded from, and contents that failed to load since, if any:
    /// a failure is logged once per content.
    seen: Mutex<(CaDirContents, Option<CaDirContents>)>,
}

/// A CA and a serving certificate it issued.
pub(crate) struct Generation {
    pub(crate) ca: Arc<LocalCa>,
    serving: ServingCertificate,
}

impl Authority {
    /// Loads the CA of `dir`; with `create_root`, an empty `dir` gets a self-signed root for
    /// `trust_domain` first.
    pub(crate) fn load(
        dir: &Path,
        create_root: Option<&TrustDomain>,
        server_names: Vec<ServingName>,
        provider: Arc<CryptoProvider>,
        metrics: Metrics,
    ) -> Result<Self, LoadCaError> {
        if let Some(trust_domain) = create_root {
            LocalCa::load_or_create(dir, trust_domain).map_err(LoadCaError::Load)?;
        }
        let contents = CaDirContents::read(dir);
        if contents.is_empty() {
            return Err(LoadCaError::Empty(dir.to_owned()));
        }
        let ca = LocalCa::from_contents(&contents).map_err(LoadCaError::Load)?;
        let generation = Generation::new(Arc::new(ca), &server_names, &provider)
            .map_err(LoadCaError::Serving)?;
        generation.report(&metrics);
        Ok(Self {
            dir: dir.to_owned(),
            server_names,
            provider,
            metrics,
            current: RwLock::new(Arc::new(generation)),
            seen: Mutex::new((contents, None)),
        })
    }

    /// The CA and serving certificate to use now.
    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the CA if its files changed since the last look, and replaces the serving
    /// certificate when it is due.
    pub(crate) fn refresh(&self) {
        self.refresh_at(SystemTime::now());
    }

    fn refresh_at(&self, now: SystemTime) {
        let contents = CaDirContents::read(&self.dir);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0 == contents {
            drop(seen);
            if now >= self.current().serving.renew_at {
                self.renew_serving();
            }
            return;
        }
        let loaded = LocalCa::from_contents(&contents)
            .map_err(LoadCaError::Load)
            .and_then(|ca| {
                Generation::new(Arc::new(ca), &self.server_names, &self.provider)
                    .map_err(LoadCaError::Serving)
            });
        match loaded {
            Ok(generation) => {
                generation.report(&self.metrics);
                self.replace(generation);
                *seen = (contents, None);
                tracing::info!(dir = %self.dir.display(), "reloaded the CA; the serving certificate is now issued by it");
            }
            Err(error) => {
                self.metrics.count_reload_failure();
                if seen.1.as_ref() != Some(&contents) {
                    tracing::error!(
                        dir = %self.dir.display(),
                        error = %WithCauses(&error),
                        "the CA directory changed but does not load; still signing with the previous CA, trying again at each poll"
                    );
                    seen.1 = Some(contents);
                }
            }
        }
    }

    fn renew_serving(&self) {
        let ca = self.current().ca.clone();
        match Generation::new(ca, &self.server_names, &self.provider) {
            Ok(generation) => {
                self.replace(generation);
                tracing::info!("renewed the serving certificate");
            }
            // The current certificate stays valid for its second half-life; the next poll
            // tries again.
            Err(error) => tracing::warn!(
                error = %WithCauses(&error),
                "failed to renew the serving certificate"
            ),
        }
    }

    fn replace(&self, generation: Generation) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(generation);
    }
}

impl Generation {
    fn new(
        ca: Arc<LocalCa>,
        server_names: &[ServingName],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ServingError> {
        let serving = issue_serving_certificate(&ca, server_names, provider)?;
        Ok(Self { ca, serving })
    }

    /// The roots, PEM, one after the other: what the agents are given to trust.
    pub(crate) fn roots_pem(&self) -> String {
        self.ca
            .roots()
            .iter()
            .map(|root| certificate_pem(root))
            .collect()
    }

    /// Exports when the earliest root expires.
    fn report(&self, metrics: &Metrics) {
        let expiries = self
            .ca
            .roots()
            .iter()
            .filter_map(|root| certificate_not_after(root).ok());
        if let Some(earliest) = expiries.min() {
            metrics.set_root_expiry(earliest);
        }
    }
}

/// Hands each TLS handshake the current serving certificate.
#[derive(Debug)]
pub(crate) struct ServingResolver(pub(crate) Arc<Authority>);

impl ResolvesServerCert for ServingResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().serving.key.clone())
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("server_names", &self.server_names)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Duration;

    use super::*;

    fn trust_domain() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    fn load(dir: &Path, create_root: bool) -> Result<Authority, LoadCaError> {
        let trust_domain = trust_domain();
        Authority::load(
            dir,
            create_root.then_some(&trust_domain),
            vec!["localhost".parse().unwrap()],
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            Metrics::new(&mut prometheus_client::registry::Registry::default()),
        )
    }

    /// The serving certificate's chain, leaf first.
    fn serving_chain(authority: &Authority) -> Vec<Vec<u8>> {
        let current = authority.current();
        current
            .serving
            .key
            .cert
            .iter()
            .map(|c| c.to_vec())
            .collect()
    }

    /// Replaces the CA in `dir` with a new self-signed root.
    fn new_root(dir: &Path) {
        let fresh = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(fresh.path(), &trust_domain()).unwrap();
        for file in CA_FILES {
            fs::copy(fresh.path().join(file), dir.join(file)).unwrap();
        }
    }

    #[test]
    fn an_empty_directory_needs_create_root() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path(), false),
            Err(LoadCaError::Empty(_))
        ));
        let created = load(dir.path(), true).unwrap();
        assert!(dir.path().join(CA_KEY_FILE).exists());
        assert_eq!(created.current().ca.roots().len(), 1);
    }

    #[test]
    fn a_changed_directory_is_reloaded_with_a_new_serving_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let authority = load(dir.path(), true).unwrap();
        let (roots, serving) = (
            authority.current().ca.roots().to_vec(),
            serving_chain(&authority),
        );
        authority.refresh();
        assert_eq!(serving_chain(&authority), serving, "nothing changed");

        new_root(dir.path());
        authority.refresh();
        let reloaded = authority.current();
        assert_ne!(reloaded.ca.roots(), roots.as_slice());
        let chain = serving_chain(&authority);
        assert_eq!(chain[1], reloaded.ca.roots()[0].to_vec());
    }

    #[test]
    fn a_directory_that_does_not_load_leaves_the_previous_ca() {
        let dir = tempfile::tempdir().unwrap();
        let authority = load(dir.path(), true).unwrap();
        let roots = authority.current().ca.roots().to_vec();
        fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        authority.refresh();
        assert_eq!(authority.current().ca.roots(), roots.as_slice());
    }

    #[test]
    fn the_serving_certificate_is_renewed_at_half_life() {
        let dir = tempfile::tempdir().unwrap();
        let authority = load(dir.path(), true).unwrap();
        let serving = serving_chain(&authority);
        let renew_at = authority.current().serving.renew_at;
        authority.refresh_at(renew_at - Duration::from_secs(1));
        assert_eq!(serving_chain(&authority), serving);
        authority.refresh_at(renew_at);
        assert_ne!(serving_chain(&authority)[0], serving[0]);
    }
}
