//! The server's credentials: a CA and a bearer token kept in a directory and reused on
//! restart, so that clients that loaded the kubeconfig before a restart still trust the server
//! and are still let in; and a serving certificate that CA signs afresh on every start.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const TOKEN_FILE: &str = "token";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{} is not a usable key", .0.display())]
    ParseKey(PathBuf, #[source] rcgen::Error),
    #[error("{} is not a usable CA certificate", .0.display())]
    ParseCaCert(PathBuf, #[source] rcgen::Error),
    #[error("{} is empty", .0.display())]
    EmptyToken(PathBuf),
    #[error("failed to generate a token")]
    GenerateToken(#[source] rustls::Error),
    #[error("failed to create a certificate")]
    CreateCertificate(#[source] rcgen::Error),
    #[error("failed to read back a generated certificate")]
    ParseCertificate(#[source] rustls::pki_types::pem::Error),
    #[error("the serving certificate is not usable")]
    ServerConfig(#[source] rustls::Error),
}

/// The CA that signs the serving certificate and the token clients present.
pub(super) struct Credentials {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads the credentials from `dir`, creating whichever is missing.
    pub(super) fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        fs::create_dir_all(dir).map_err(|e| TlsError::CreateDir(dir.to_owned(), e))?;
        let (ca_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !ca_path.exists() || !key_path.exists() {
            create_ca(&ca_path, &key_path)?;
        }
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::ParseKey(key_path, e))?;
        let ca_pem = read(&ca_path)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| TlsError::ParseCaCert(ca_path, e))?;

        let token_path = dir.join(TOKEN_FILE);
        if !token_path.exists() {
            write_private(&token_path, &random_token()?)?;
        }
        let token = read(&token_path)?.trim().to_owned();
        if token.is_empty() {
            return Err(TlsError::EmptyToken(token_path));
        }
        Ok(Self {
            ca_pem,
            issuer,
            token,
        })
    }

    pub(super) fn token(&self) -> &str {
        &self.token
    }

    pub(super) fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A TLS configuration with a new certificate for `localhost`, the loopback addresses and
    /// `listen_ip`.
    pub(super) fn server_config(
        &self,
        listen_ip: IpAddr,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
        if !listen_ip.is_unspecified() {
            names.push(listen_ip.to_string());
        }
        let mut params = CertificateParams::new(names).map_err(TlsError::CreateCertificate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "fake-apiserver");
        let key = KeyPair::generate().map_err(TlsError::CreateCertificate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::CreateCertificate)?;
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(TlsError::ParseCertificate)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::ServerConfig)?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), ca], key)
            .map_err(TlsError::ServerConfig)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn create_ca(ca_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let key = KeyPair::generate().map_err(TlsError::CreateCertificate)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "fake-apiserver-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&key)
        .map_err(TlsError::CreateCertificate)?;
    write_private(key_path, &key.serialize_pem())?;
    fs::write(ca_path, cert.pem()).map_err(|e| TlsError::Write(ca_path.to_owned(), e))
}

/// 32 random bytes, hex.
fn random_token() -> Result<String, TlsError> {
    let mut bytes = [0_u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| TlsError::GenerateToken(e.into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|e| TlsError::Read(path.to_owned(), e))
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| TlsError::Write(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_reused() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("a temporary directory");
        };
        let load = || match Credentials::load_or_create(dir.path()) {
            Ok(credentials) => credentials,
            Err(e) => panic!("{e}"),
        };
        let first = load();
        assert_eq!(first.token().len(), 64);
        let again = load();
        assert_eq!(again.token(), first.token());
        assert_eq!(again.ca_pem(), first.ca_pem());
        assert!(again.server_config(IpAddr::from([10, 0, 0, 1])).is_ok());
    }
}
