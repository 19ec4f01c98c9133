//! The server's TLS: a short-lived serving certificate issued by the CA it serves, so that a
//! client that trusts the CA's roots trusts the server; TLS 1.2 and 1.3, ALPN `h2`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_identity::LocalCa;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{DnsName, ServerName, UnixTime};

/// How long a serving certificate lives; it is replaced at half-life.
const SERVING_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A name the server answers to: a DNS name, or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingName(ServerName<'static>);

/// Why a string is not a name a server certificate can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a DNS name nor an IP address")]
pub struct ServingNameError(String);

impl FromStr for ServingName {
    type Err = ServingNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(ServerName::from(ip)));
        }
        DnsName::try_from(s.to_owned())
            .map(|dns| Self(ServerName::DnsName(dns)))
            .map_err(|_| ServingNameError(s.to_owned()))
    }
}

impl fmt::Display for ServingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_str())
    }
}

/// Why the CA could not issue a serving certificate that verifies against its own roots.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("no server name to certify")]
    NoName,
    #[error("failed to issue the serving certificate")]
    Issue(#[source] rcgen::Error),
    #[error("the CA's roots are not usable trust anchors")]
    Roots(#[source] rustls::Error),
    #[error("the CA's roots are not usable for verification")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error(
        "a certificate the CA issued does not verify against its roots: the key, the CA certificate, its chain and the roots must belong together"
    )]
    Verify(#[source] rustls::Error),
    #[error("the serving key is unusable")]
    Key(#[source] rustls::Error),
}

/// A serving certificate and when it is due for replacement.
#[derive(Debug, Clone)]
pub(crate) struct ServingCertificate {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) renew_at: SystemTime,
}

/// Issues a serving certificate for `names` from `ca`, and checks that it verifies against the
/// CA's roots: a CA directory whose files do not belong together is refused here, before it
/// signs anything.
pub(crate) fn issue_serving_certificate(
    ca: &LocalCa,
    names: &[ServingName],
    provider: &Arc<CryptoProvider>,
) -> Result<ServingCertificate, ServingError> {
    let first = names.first().ok_or(ServingError::NoName)?;
    let names: Vec<ServerName<'static>> = names.iter().map(|name| name.0.clone()).collect();
    let (chain, key) = ca
        .issue_server_certificate(&names, SERVING_TTL)
        .map_err(ServingError::Issue)?;
    let mut roots = RootCertStore::empty();
    for root in ca.roots() {
        roots.add(root.clone()).map_err(ServingError::Roots)?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(ServingError::Verifier)?;
    if let [leaf, intermediates @ ..] = chain.as_slice() {
        verifier
            .verify_server_cert(leaf, intermediates, &first.0, &[], UnixTime::now())
            .map_err(ServingError::Verify)?;
    }
    let key = CertifiedKey::from_der(chain, key, provider).map_err(ServingError::Key)?;
    Ok(ServingCertificate {
        key: Arc::new(key),
        renew_at: SystemTime::now() + SERVING_TTL / 2,
    })
}

/// The server's TLS configuration, presenting whatever certificate `certificates` holds at each
/// handshake.
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    certificates: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names_or_addresses() {
        let name = |text: &str| text.parse::<ServingName>().map(|name| name.0);
        assert!(matches!(
            name("ambit-ca.ambit-system.svc"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(name("127.0.0.1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(name("not a name").is_err());
        assert!(name("").is_err());
    }

    #[test]
    fn a_serving_certificate_verifies_against_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &"cluster.local".parse().unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        for names in [
            ["localhost".parse().unwrap()],
            ["10.0.0.1".parse().unwrap()],
        ] {
            let serving = issue_serving_certificate(&ca, &names, &provider).unwrap();
            assert_eq!(serving.key.cert.len(), 2);
            assert!(serving.renew_at > SystemTime::now() + SERVING_TTL / 3);
        }
    }
}
