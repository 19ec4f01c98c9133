//! The rustls configurations of HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, mutual
//! authentication by SPIFFE identity, no SNI and no session resumption.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::certificate::{CertificateError, WorkloadCertificate, certificate_identity};
use crate::spiffe::{Identity, TrustDomain};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The name of the cryptography library behind every TLS connection.
pub const CRYPTO_PROVIDER_NAME: &str = "aws-lc-rs";

/// Why a peer's certificate was refused after its chain verified.
#[derive(Debug, thiserror::Error)]
pub enum PeerVerifyError {
    #[error("the peer certificate carries no workload identity")]
    PeerIdentity(#[source] CertificateError),
    #[error("peer identity {peer} is not in trust domain {expected}")]
    TrustDomainMismatch {
        peer: Identity,
        expected: TrustDomain,
    },
    #[error("server identity {presented} is not one of the expected identities {expected:?}")]
    SanMismatch {
        presented: Identity,
        expected: Vec<Identity>,
    },
}

/// aws-lc-rs restricted to the two AES-GCM suites HBONE allows.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// The server side of HBONE for the workload that owns `cert`: any client whose chain verifies
/// against the trust bundle and whose identity is in the same trust domain is accepted; what it
/// may reach is for authorization to decide.
pub fn server_config(cert: &WorkloadCertificate) -> ServerConfig {
    let provider = crypto_provider();
    let verifier = TrustDomainVerifier {
        chain: client_chain_verifier(cert.roots().clone(), provider.clone()),
        trust_domain: cert.identity().trust_domain().clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| unreachable_tls13(&e))
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            cert.certified_key().clone(),
        )));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config
}

/// The client side of HBONE for the workload that owns `cert`, accepting only a server that
/// proves one of the `expected` identities.
pub fn client_config(cert: &WorkloadCertificate, expected: &[Identity]) -> ClientConfig {
    let provider = crypto_provider();
    let verifier = ExpectedIdentityVerifier {
        roots: cert.roots().clone(),
        algorithms: provider.signature_verification_algorithms,
        expected: expected.to_vec(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| unreachable_tls13(&e))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            cert.certified_key().clone(),
        )));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config
}

/// The provider above always has TLS 1.3 suites, so restricting it to TLS 1.3 cannot fail.
fn unreachable_tls13(error: &rustls::Error) -> ! {
    unreachable!("the HBONE crypto provider supports TLS 1.3: {error}")
}

fn client_chain_verifier(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Arc<dyn ClientCertVerifier> {
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        // The builder fails only for an empty root store, which `WorkloadCertificate` rules out.
        .unwrap_or_else(|e| unreachable!("a workload certificate has a trust bundle: {e}"))
}

fn refuse(error: PeerVerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(error),
    )))
}

fn peer_identity(end_entity: &CertificateDer<'_>) -> Result<Identity, rustls::Error> {
    certificate_identity(end_entity).map_err(|e| refuse(PeerVerifyError::PeerIdentity(e)))
}

/// Checks the chain (and the clientAuth EKU) with webpki, then the trust domain of the SAN.
struct TrustDomainVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl fmt::Debug for TrustDomainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustDomainVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_identity(end_entity)?;
        if peer.trust_domain() != &self.trust_domain {
            return Err(refuse(PeerVerifyError::TrustDomainMismatch {
                peer,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Verifies the server's chain without a server name (HBONE sends no SNI and workload
/// certificates carry no DNS names), then requires its SPIFFE ID to be one of `expected`.
#[derive(Debug)]
struct ExpectedIdentityVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for ExpectedIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = peer_identity(end_entity)?;
        if !self.expected.contains(&presented) {
            return Err(refuse(PeerVerifyError::SanMismatch {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
