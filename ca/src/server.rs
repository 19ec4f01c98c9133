//! `ambit ca`: Istio's certificate service, issuing each identity only to a caller entitled to
//! it.
//!
//! A request goes through four steps, each its own module: the caller's token is reviewed by
//! the API server (`authenticate`); the identity asked for is the caller's own or the one it
//! impersonates (`request`); impersonation is allowed to trusted node agents for pods on their
//! node (`authorize`); the CSR is signed by the CA of the `cacerts` directory (`signer`,
//! `authority`). The server proves itself with a certificate from that same CA (`tls`), so a
//! client needs the roots it already has. [`CaServer`] serves one connection at a time for the
//! caller's accept loop, and watches the CA directory. Besides, it may publish its roots for
//! the agents in a ConfigMap (`root_publisher`), and keep a root it created in a Secret
//! (`root_secret`).

mod api;
mod authenticate;
mod authority;
mod authorize;
mod connection;
mod metrics;
mod namespaced_name;
mod refusal;
mod request;
mod root_publisher;
mod root_secret;
mod service;
mod service_account;
mod signer;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::TrustDomain;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub use api::ApiCallError;
pub use authority::LoadCaError;
pub use namespaced_name::{NamespacedName, ObjectName, ObjectNameError};
pub use request::{TtlPolicy, TtlPolicyError};
pub use root_secret::RootSecretError;
pub use service_account::{ServiceAccount, ServiceAccountError};
pub use tls::{ServingError, ServingName, ServingNameError};

use authenticate::Authenticator;
use authority::{Authority, ServingResolver};
use authorize::Authorizer;
use metrics::Metrics;
use root_publisher::RootPublisher;
use service::CertificateService;

use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;

/// How often the CA directory is compared with what was loaded.
const CA_DIR_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A certificate request is a CSR and a little metadata.
const MAX_REQUEST_SIZE: usize = 64 * 1024;
/// Connections served at once: a node agent holds one, and workloads calling for their own
/// identity come and go. Past this, new connections are closed at once.
const MAX_CONNECTIONS: usize = 4096;

/// What the server issues, to whom, and the names it answers to.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Istio's `cacerts` layout: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// `cert-chain.pem`.
    pub ca_dir: PathBuf,
    /// Whether the CA makes a self-signed root of its own, and where it keeps it.
    pub create_root: CreateRoot,
    /// The ConfigMap the roots are published in for the agents, if any.
    pub root_configmap: Option<NamespacedName>,
    /// The only trust domain identities are issued in.
    pub trust_domain: TrustDomain,
    /// The audience callers' tokens must be valid for.
    pub audience: String,
    /// The cluster this CA serves; callers naming another are refused.
    pub cluster_id: String,
    /// The node agents' service accounts: they may ask for the identities of pods on their node.
    pub trusted_node_accounts: Vec<ServiceAccount>,
    pub ttl: TtlPolicy,
    /// The serving certificate's names.
    pub server_names: Vec<ServingName>,
}

/// Whether the CA makes a root of its own, and where it keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRoot {
    /// Never: the directory must hold a CA.
    Never,
    /// A self-signed root created in the directory when it is empty, which lives as long as
    /// the directory.
    InDir,
    /// A self-signed root kept in this Secret: at start, restored from it into the directory
    /// (whatever the directory held), or created there and stored in a new Secret.
    KeptIn(NamespacedName),
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    RootSecret(#[from] RootSecretError),
    #[error(transparent)]
    LoadCa(#[from] LoadCaError),
    #[error("failed to configure TLS")]
    Tls(#[source] rustls::Error),
}

/// The certificate service, ready to serve connections.
pub struct CaServer {
    authority: Arc<Authority>,
    publisher: Option<RootPublisher>,
    tls: TlsAcceptor,
    grpc: IstioCertificateServiceServer<CertificateService>,
    connections: Semaphore,
}

impl CaServer {
    /// Loads the CA (restoring or keeping a created root in its Secret first) and issues the
    /// serving certificate; `client` reaches the API server that reviews tokens, knows the pods
    /// and holds the CA's Secret and ConfigMap, and the metrics are registered in `registry`.
    pub async fn start(
        config: ServerConfig,
        client: kube::Client,
        registry: &mut Registry,
    ) -> Result<Self, StartError> {
        let metrics = Metrics::new(registry);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let create_in_dir = match &config.create_root {
            CreateRoot::Never => None,
            CreateRoot::InDir => Some(&config.trust_domain),
            // Restored or created and kept: the directory holds the CA now, and no other root
            // may be made in it.
            CreateRoot::KeptIn(secret) => {
                root_secret::restore_or_keep(
                    client.clone(),
                    secret,
                    &config.ca_dir,
                    &config.trust_domain,
                )
                .await?;
                None
            }
        };
        let authority = Arc::new(Authority::load(
            &config.ca_dir,
            create_in_dir,
            config.server_names,
            provider.clone(),
            metrics.clone(),
        )?);
        let publisher = config
            .root_configmap
            .map(|target| RootPublisher::new(client.clone(), target, metrics.clone()));
        let resolver = Arc::new(ServingResolver(authority.clone()));
        let tls = tls::server_config(provider, resolver).map_err(StartError::Tls)?;
        let service = CertificateService {
            authority: authority.clone(),
            authenticator: Authenticator::new(client.clone(), config.audience, config.cluster_id),
            authorizer: Authorizer::new(client, config.trusted_node_accounts),
            trust_domain: config.trust_domain,
            ttl: config.ttl,
            metrics,
        };
        Ok(Self {
            authority,
            publisher,
            tls: TlsAcceptor::from(Arc::new(tls)),
            grpc: IstioCertificateServiceServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_SIZE),
            connections: Semaphore::new(MAX_CONNECTIONS),
        })
    }

    /// Serves one accepted connection until it closes; once `stop` resolves, the requests in
    /// flight are answered and the connection closed. Past `MAX_CONNECTIONS` the connection
    /// is closed at once.
    pub async fn serve_connection(
        &self,
        tcp: TcpStream,
        client: SocketAddr,
        stop: impl Future<Output = ()>,
    ) {
        let Ok(_slot) = self.connections.try_acquire() else {
            tracing::debug!(src.addr = %client, "too many connections: closed at once");
            return;
        };
        connection::serve(&self.tls, self.grpc.clone(), tcp, client, stop).await;
    }

    /// Reloads the CA whenever its directory changes, renews the serving certificate at
    /// half-life, and publishes the roots of the CA loaded (the first poll is at once). Runs
    /// until dropped.
    pub async fn watch_ca_dir(&self) {
        let mut interval = tokio::time::interval(CA_DIR_POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.authority.refresh();
            if let Some(publisher) = &self.publisher {
                publisher
                    .publish(&self.authority.current().roots_pem())
                    .await;
            }
        }
    }
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("authority", &self.authority)
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}
