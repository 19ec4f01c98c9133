//! A workload's certificate, its private key and the trust bundle it was issued under.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe::{Identity, IdentityError};

/// Why a certificate cannot serve as a workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the trust bundle is empty")]
    EmptyTrustBundle,
    #[error("failed to parse the leaf certificate: {0}")]
    ParseLeaf(String),
    #[error("failed to read the subject alternative names: {0}")]
    ParseSan(String),
    #[error("the leaf certificate has {0} URI SANs; a workload certificate has exactly one")]
    UriSanCount(usize),
    #[error("the URI SAN is not a workload identity")]
    SanIdentity(#[source] IdentityError),
    #[error("the trust bundle holds a certificate that is not a valid trust anchor")]
    TrustAnchor(#[source] rustls::Error),
    #[error("the private key does not fit the certificate")]
    PrivateKey(#[source] rustls::Error),
}

/// Everything a workload needs to speak HBONE: its certificate chain (leaf first), the matching
/// private key, and the roots that peers' certificates must chain to.
pub struct WorkloadCertificate {
    identity: Identity,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Checks that `chain` starts with a leaf for exactly one workload identity and that `key`
    /// belongs to it, and loads `trust_bundle` as the roots for verifying peers.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_bundle: &[CertificateDer<'static>],
        provider: &CryptoProvider,
    ) -> Result<Self, CertificateError> {
        let leaf = chain.first().ok_or(CertificateError::EmptyChain)?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|e| CertificateError::ParseLeaf(e.to_string()))?;
        let identity = uri_san_identity(&parsed)?;
        let serial = parsed.raw_serial_as_string();
        let validity = parsed.validity();
        let not_before = unix_time(validity.not_before.timestamp());
        let not_after = unix_time(validity.not_after.timestamp());

        if trust_bundle.is_empty() {
            return Err(CertificateError::EmptyTrustBundle);
        }
        let mut roots = RootCertStore::empty();
        for root in trust_bundle {
            roots
                .add(root.clone())
                .map_err(CertificateError::TrustAnchor)?;
        }
        let key =
            CertifiedKey::from_der(chain, key, provider).map_err(CertificateError::PrivateKey)?;

        Ok(Self {
            identity,
            key: Arc::new(key),
            roots: Arc::new(roots),
            serial,
            not_before,
            not_after,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The certificate chain, leaf first, with the private key: what rustls presents to peers.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The roots that a peer's certificate must chain to.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The leaf's serial number, in colon-separated hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The whole validity period; zero for a certificate that is valid for no time at all.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The workload identity that a DER certificate speaks for: its one URI SAN.
pub fn certificate_identity(der: &CertificateDer<'_>) -> Result<Identity, CertificateError> {
    let (_, parsed) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::ParseLeaf(e.to_string()))?;
    uri_san_identity(&parsed)
}

/// When a DER certificate stops being valid: how long a connection it authenticated may live.
pub fn certificate_not_after(der: &CertificateDer<'_>) -> Result<SystemTime, CertificateError> {
    let (_, parsed) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::ParseLeaf(e.to_string()))?;
    Ok(unix_time(parsed.validity().not_after.timestamp()))
}

/// A DER certificate's serial number, in colon-separated hex as [`WorkloadCertificate::serial`]
/// shows it.
pub fn certificate_serial(der: &CertificateDer<'_>) -> Result<String, CertificateError> {
    let (_, parsed) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::ParseLeaf(e.to_string()))?;
    Ok(parsed.raw_serial_as_string())
}

fn uri_san_identity(cert: &X509Certificate<'_>) -> Result<Identity, CertificateError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertificateError::ParseSan(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(CertificateError::SanIdentity),
        (None, _) => Err(CertificateError::UriSanCount(0)),
        (Some(_), Some(_)) => Err(CertificateError::UriSanCount(2 + uris.count())),
    }
}

fn unix_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}
