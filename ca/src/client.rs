//! The agent's client of Istio's certificate service: keys are generated here, only
//! certificate signing requests leave the node.
//!
//! It speaks to `ambit ca` and to istiod alike: the node's service-account token as a bearer
//! token, the cluster's name in `clusterid`, and the workload's identity as
//! `ImpersonatedIdentity` in the request's metadata, as ztunnel sends them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_identity::{
    CertificateProvider, Identity, IssueError, IssueFuture, WorkloadCertificate, crypto_provider,
};
use http::Uri;
use hyper_util::rt::TokioIo;
use prost_types::value::Kind;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::{CLUSTER_ID_HEADER, IMPERSONATED_IDENTITY};

/// How long connecting to the CA (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the CA is and how this node proves who it is.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `https://host:port` of the CA.
    pub address: Uri,
    /// PEM roots that authenticate the CA; read again when it changes.
    pub root_file: PathBuf,
    /// The name the CA's certificate must carry; the host of `address` when `None`.
    pub server_name: Option<String>,
    /// The service-account token sent as the bearer token, read for every request because
    /// the kubelet rotates projected tokens.
    pub token_file: PathBuf,
    pub cluster_id: String,
    /// The lifetime asked for; the CA may shorten it.
    pub ttl: Duration,
}

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaCallError {
    #[error("cannot read the token file {}", .0.display())]
    Token(PathBuf, #[source] std::io::Error),
    #[error("the token in {} is not a valid header value", .0.display())]
    TokenValue(PathBuf),
    #[error("the cluster name {0:?} is not a valid header value")]
    ClusterId(String),
    #[error("cannot read the CA roots {}", .0.display())]
    Roots(PathBuf, #[source] std::io::Error),
    #[error("{} holds no PEM certificate that can be a trust anchor", .0.display())]
    NoRoots(PathBuf),
    #[error("{0:?} is not a TLS server name")]
    ServerName(String),
    #[error("the CA address {0} has no host")]
    Address(Uri),
    #[error("the CA answered: {0}")]
    Status(#[from] tonic::Status),
}

/// A client of `istio.v1.auth.IstioCertificateService`.
#[derive(Debug)]
pub struct CaClient {
    config: CaClientConfig,
    /// The channel, and the contents of the root file it was made with.
    channel: Mutex<Option<(Vec<u8>, Channel)>>,
}

impl CaClient {
    pub fn new(config: CaClientConfig) -> Self {
        Self {
            config,
            channel: Mutex::default(),
        }
    }

    /// One `CreateCertificate` call, authenticated with the current token.
    pub async fn create_certificate(
        &self,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, CaCallError> {
        let token_file = &self.config.token_file;
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| CaCallError::Token(token_file.clone(), e))?;
        let mut bearer = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| CaCallError::TokenValue(token_file.clone()))?;
        // Kept out of HTTP/2's header compression tables.
        bearer.set_sensitive(true);
        let cluster_id = MetadataValue::try_from(self.config.cluster_id.as_str())
            .map_err(|_| CaCallError::ClusterId(self.config.cluster_id.clone()))?;

        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert("authorization", bearer);
        request.metadata_mut().insert(CLUSTER_ID_HEADER, cluster_id);
        let mut client = IstioCertificateServiceClient::new(self.channel()?);
        Ok(client.create_certificate(request).await?.into_inner())
    }

    /// The channel to the CA, made again when the root file changed so that a rotated CA
    /// certificate is trusted.
    fn channel(&self) -> Result<Channel, CaCallError> {
        let root_file = &self.config.root_file;
        let pem = std::fs::read(root_file).map_err(|e| CaCallError::Roots(root_file.clone(), e))?;
        let mut cached = self.channel.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((made_with, channel)) = cached.as_ref()
            && *made_with == pem
        {
            return Ok(channel.clone());
        }
        let channel = self.connect(&pem)?;
        *cached = Some((pem, channel.clone()));
        Ok(channel)
    }

    fn connect(&self, roots_pem: &[u8]) -> Result<Channel, CaCallError> {
        let roots = trust_anchors(roots_pem)
            .filter(|roots| !roots.is_empty())
            .ok_or_else(|| CaCallError::NoRoots(self.config.root_file.clone()))?;
        let address = &self.config.address;
        let name = match &self.config.server_name {
            Some(name) => name.clone(),
            None => address
                .host()
                .ok_or_else(|| CaCallError::Address(address.clone()))?
                .trim_matches(['[', ']'])
                .to_owned(),
        };
        let name = ServerName::try_from(name.clone()).map_err(|_| CaCallError::ServerName(name))?;
        let tls = Arc::new(tls_config(roots));
        let connector = tower::service_fn(move |uri: Uri| {
            let (tls, name) = (tls.clone(), name.clone());
            async move {
                let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
                let tcp = TcpStream::connect(authority).await?;
                tcp.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        Ok(Endpoint::from(address.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(connector))
    }

    fn authority(&self) -> String {
        self.config.address.to_string()
    }

    async fn issue(&self, identity: &Identity) -> Result<WorkloadCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let mut params = CertificateParams::default();
        let uri = identity.as_str().try_into().map_err(IssueError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(IssueError::Sign)?;
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.config.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(impersonating(identity)),
        };
        let response = self.create_certificate(request).await.map_err(|error| {
            let authority = self.authority();
            match error {
                CaCallError::Status(status) => match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown => IssueError::Unreachable {
                        authority,
                        source: Box::new(status),
                    },
                    _ => IssueError::Refused {
                        authority,
                        source: Box::new(status),
                    },
                },
                other @ (CaCallError::Token(..) | CaCallError::TokenValue(_)) => {
                    IssueError::Credential(Box::new(other))
                }
                other => IssueError::Unreachable {
                    authority,
                    source: Box::new(other),
                },
            }
        })?;
        let chain = ResponseChain::parse(&response).map_err(|reason| IssueError::BadResponse {
            authority: self.authority(),
            reason,
        })?;
        chain.verify().map_err(|reason| IssueError::BadResponse {
            authority: self.authority(),
            reason,
        })?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // Peers are trusted by the roots the CA names, as in ztunnel; the root file only
        // authenticates the CA.
        WorkloadCertificate::new(chain.certificates, key, &chain.roots, &crypto_provider())
            .map_err(IssueError::Unusable)
    }
}

impl CertificateProvider for CaClient {
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a> {
        Box::pin(CaClient::issue(self, identity))
    }
}

/// The metadata asking for `identity` on behalf of a workload of this node.
fn impersonating(identity: &Identity) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(Kind::StringValue(identity.to_string())),
    };
    prost_types::Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), value)]),
    }
}

/// The TLS client of the CA channel: the CA is authenticated by name against `roots`; no
/// client certificate (the token authenticates the node).
fn tls_config(roots: Vec<CertificateDer<'static>>) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("aws-lc-rs supports the default TLS versions: {e}"))
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// The certificates of a PEM text, or `None` if it is not a PEM certificate list.
fn trust_anchors(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

/// A `CreateCertificate` answer taken apart.
#[derive(Debug, PartialEq)]
struct ResponseChain {
    /// The leaf, then the intermediates.
    certificates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl ResponseChain {
    /// Istio's layout: the leaf first, the root last; the last element may hold several roots
    /// (during a rotation), and any element between is part of the chain.
    fn parse(response: &IstioCertificateResponse) -> Result<Self, String> {
        let [leaf, intermediates @ .., roots] = response.cert_chain.as_slice() else {
            return Err(format!(
                "{} elements; a chain has at least the leaf and the root",
                response.cert_chain.len()
            ));
        };
        let parse = |what: &str, pem: &str| {
            trust_anchors(pem.as_bytes())
                .filter(|certs| !certs.is_empty())
                .ok_or_else(|| format!("the {what} is not a PEM certificate"))
        };
        let mut certificates = parse("leaf", leaf)?;
        if certificates.len() != 1 {
            return Err("the first element holds more than the leaf".to_owned());
        }
        for intermediate in intermediates {
            certificates.extend(parse("chain", intermediate)?);
        }
        Ok(Self {
            certificates,
            roots: parse("root", roots)?,
        })
    }

    /// Checks that the leaf is valid now and chains, through the intermediates, to the roots
    /// it came with, as peers will check it: a CA that answers with a broken chain is found
    /// at issuance, not in every handshake that follows.
    fn verify(&self) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(self.roots.iter().cloned());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
                .build()
                .map_err(|e| format!("the roots are unusable: {e}"))?;
        let (leaf, intermediates) = self
            .certificates
            .split_first()
            .ok_or_else(|| "no leaf".to_owned())?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(drop)
            .map_err(|e| format!("the leaf does not verify against the roots it came with: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(count: usize) -> (String, Vec<CertificateDer<'static>>) {
        let mut text = String::new();
        let mut ders = Vec::new();
        for _ in 0..count {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = CertificateParams::default().self_signed(&key).unwrap();
            text.push_str(&cert.pem());
            ders.push(cert.der().clone());
        }
        (text, ders)
    }

    fn response(elements: &[&str]) -> IstioCertificateResponse {
        IstioCertificateResponse {
            cert_chain: elements.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_last_element_holds_the_roots_and_the_others_the_chain() {
        let (leaf, leaf_der) = pem(1);
        let (intermediate, intermediate_der) = pem(1);
        let (roots, roots_der) = pem(2);
        let chain = ResponseChain::parse(&response(&[&leaf, &intermediate, &roots])).unwrap();
        assert_eq!(chain.certificates, [leaf_der, intermediate_der].concat());
        assert_eq!(chain.roots, roots_der);
    }

    /// A chain signed by a new CA, with that CA's roots.
    fn issued() -> ResponseChain {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            ambit_identity::LocalCa::load_or_create(dir.path(), &"cluster.local".parse().unwrap())
                .unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        ResponseChain {
            certificates: ca
                .sign_request(&csr, &identity, Duration::from_secs(60))
                .unwrap(),
            roots: ca.roots().to_vec(),
        }
    }

    #[test]
    fn a_leaf_must_chain_to_the_roots_it_came_with() {
        let chain = issued();
        chain.verify().unwrap();
        let other = issued();
        let mixed = ResponseChain {
            certificates: chain.certificates,
            roots: other.roots,
        };
        assert!(mixed.verify().is_err());
    }

    #[test]
    fn a_response_without_a_root_or_with_garbage_is_refused() {
        let (leaf, _) = pem(1);
        let (two, _) = pem(2);
        for bad in [
            response(&[]),
            response(&[&leaf]),
            response(&[&leaf, "not a certificate"]),
            response(&["", &leaf]),
            response(&[&two, &leaf]),
        ] {
            assert!(ResponseChain::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
