//! `ambit ca`: Istio's certificate service for the node agents, run as a Deployment of its own,
//! the only holder of the CA key. The server itself is `ambit_ca::CaServer`; this is its flags,
//! its listeners and its lifecycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ambit_ca::{
    CaServer, CreateRoot, DEFAULT_AUDIENCE, DEFAULT_CLUSTER_ID, NamespacedName, ObjectName,
    ServerConfig, ServiceAccount, ServingName, StartError, TtlPolicy, TtlPolicyError,
};
use ambit_identity::TrustDomain;
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::accept::serve_listener;
use crate::admin::OPENMETRICS;
use crate::app::{StopSignals, bind};
use crate::cli::block_on;
use crate::config::{LogFormat, parse_duration};
use crate::drain::{self, DrainWatcher};
use crate::http_server::{self, Body, Handler, respond, text};
use crate::logging;
use crate::source::kubernetes_client;

/// How long the requests in flight get to finish once asked to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Flags of `ambit ca`; each can also be set with its `AMBIT_CA_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct CaArgs {
    /// Where the certificate service listens: gRPC over TLS.
    #[arg(long, env = "AMBIT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Where Prometheus metrics (`/metrics`) are served.
    #[arg(long, env = "AMBIT_CA_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "AMBIT_CA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The CA, in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// `cert-chain.pem`), as a mounted Secret; reloaded when its files change.
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub ca_dir: PathBuf,
    /// Create a self-signed root in `--ca-dir` if it is empty; without it an empty directory
    /// is an error.
    #[arg(long, env = "AMBIT_CA_CREATE_ROOT")]
    pub create_root: bool,
    /// With `--create-root`: the Secret (in `--namespace`) that keeps the created root, so
    /// that it outlives the pod. At start its files are written into `--ca-dir`, whatever that
    /// held; without the Secret, a root is created there and a new Secret stores it.
    #[arg(
        long,
        env = "AMBIT_CA_ROOT_SECRET",
        requires = "create_root",
        requires = "namespace"
    )]
    pub root_secret: Option<ObjectName>,
    /// The ConfigMap (in `--namespace`) the CA publishes its roots in for the agents, as
    /// `root-cert.pem`: at start, after each reload of `--ca-dir`, and every minute.
    #[arg(long, env = "AMBIT_CA_ROOT_CONFIGMAP", requires = "namespace")]
    pub root_configmap: Option<ObjectName>,
    /// The namespace of `--root-configmap` and `--root-secret`: the CA's own (in a pod, from
    /// the downward API).
    #[arg(long, env = "AMBIT_CA_NAMESPACE")]
    pub namespace: Option<ObjectName>,
    /// The kubeconfig of the API server that reviews callers' tokens and knows the pods; in a
    /// pod, the service account's in-cluster configuration is used when it is absent.
    #[arg(long, env = "AMBIT_CA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The SPIFFE trust domain of the identities issued; requests for another are refused.
    #[arg(long, env = "AMBIT_CA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// The audience callers' service-account tokens must be bound to.
    #[arg(long, env = "AMBIT_CA_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// The cluster this CA serves (callers' `clusterid` metadata).
    #[arg(long, env = "AMBIT_CA_CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// The node agents' service accounts, `NAMESPACE/NAME,...`: they may ask for the identity
    /// of any pod on their node (Istio's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(
        long,
        env = "AMBIT_CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "ambit-system/ambit"
    )]
    pub trusted_node_accounts: Vec<ServiceAccount>,
    /// How long a certificate lives when the request does not say (`30m`, `24h`).
    #[arg(long, env = "AMBIT_CA_DEFAULT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub default_ttl: Duration,
    /// The longest a certificate may live; longer requests get this.
    #[arg(long, env = "AMBIT_CA_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// The names the serving certificate holds, `NAME,...`: DNS names, or IP addresses.
    #[arg(
        long,
        env = "AMBIT_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "ambit-ca.ambit-system.svc"
    )]
    pub server_names: Vec<ServingName>,
}

/// Why the flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
enum CaConfigError {
    #[error("--default-ttl and --max-ttl: {0}")]
    Ttl(#[source] TtlPolicyError),
}

/// `ambit ca`'s checked configuration.
#[derive(Debug, Clone)]
struct CaConfig {
    listen: SocketAddr,
    metrics_addr: SocketAddr,
    kubeconfig: Option<PathBuf>,
    server: ServerConfig,
}

impl TryFrom<CaArgs> for CaConfig {
    type Error = CaConfigError;

    fn try_from(args: CaArgs) -> Result<Self, Self::Error> {
        let in_namespace = |name: Option<ObjectName>| {
            Some(NamespacedName {
                namespace: args.namespace.clone()?,
                name: name?,
            })
        };
        let create_root = match (args.create_root, in_namespace(args.root_secret)) {
            (false, _) => CreateRoot::Never,
            (true, None) => CreateRoot::InDir,
            (true, Some(secret)) => CreateRoot::KeptIn(secret),
        };
        let root_configmap = in_namespace(args.root_configmap);
        Ok(Self {
            listen: args.listen,
            metrics_addr: args.metrics_addr,
            kubeconfig: args.kubeconfig,
            server: ServerConfig {
                ca_dir: args.ca_dir,
                create_root,
                root_configmap,
                trust_domain: args.trust_domain,
                audience: args.audience,
                cluster_id: args.cluster_id,
                trusted_node_accounts: args.trusted_node_accounts,
                ttl: TtlPolicy::new(args.default_ttl, args.max_ttl).map_err(CaConfigError::Ttl)?,
                server_names: args.server_names,
            },
        })
    }
}

impl CaArgs {
    /// Runs the certificate service until SIGTERM or SIGINT.
    pub(crate) fn run(self) -> ExitCode {
        // Writes out the queued log lines when the server returns.
        let (_, _flush) = logging::init(self.log_format);
        match CaConfig::try_from(self) {
            Ok(config) => block_on(serve(config)),
            Err(error) => {
                tracing::error!("{error}");
                ExitCode::from(2)
            }
        }
    }
}

async fn serve(config: CaConfig) -> anyhow::Result<()> {
    let mut stop = StopSignals::install()?;
    let client = kubernetes_client(config.kubeconfig.as_deref())
        .await
        .context("connecting to the API server")?;
    let mut registry = Registry::default();
    let ca_dir = config.server.ca_dir.clone();
    let server = match CaServer::start(config.server, client, &mut registry).await {
        Ok(server) => server,
        // The error names the Secret; the flag is the one to check.
        Err(error @ StartError::RootSecret(_)) => return Err(error).context("--root-secret"),
        Err(error) => return Err(error).context(format!("--ca-dir {}", ca_dir.display())),
    };
    let server = Arc::new(server);
    let listener = bind("--listen", config.listen).await?;
    let metrics_listener = bind("--metrics-addr", config.metrics_addr).await?;
    tracing::info!(
        listen = %local_addr(&listener),
        metrics = %local_addr(&metrics_listener),
        "serving Istio's certificate service"
    );

    let (trigger, drain) = drain::channel();
    tokio::spawn(http_server::serve(
        metrics_listener,
        drain.clone(),
        "metrics",
        MetricsEndpoint(registry),
    ));
    tokio::spawn(watch_ca_dir(server.clone(), drain.clone()));
    tokio::spawn(serve_listener(
        listener,
        drain,
        "ca",
        move |tcp, client, mut held| {
            let server = server.clone();
            async move { server.serve_connection(tcp, client, held.signaled()).await }
        },
    ));

    stop.received().await;
    tracing::info!("stopping: answering the requests in flight");
    tokio::select! {
        drained = tokio::time::timeout(SHUTDOWN_GRACE, trigger.drain()) => {
            if drained.is_err() {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still in flight at the deadline");
            }
        }
        () = stop.received() => tracing::warn!("asked again to stop; closing the open connections"),
    }
    Ok(())
}

/// Where `listener` listens, as the log shows it: the port chosen for port 0.
fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|error| error.to_string(), |addr| addr.to_string())
}

/// Reloads the CA when its directory changes, until a drain starts.
async fn watch_ca_dir(server: Arc<CaServer>, mut drain: DrainWatcher) {
    tokio::select! {
        () = server.watch_ca_dir() => {}
        () = drain.signaled() => {}
    }
}

/// `/metrics`.
#[derive(Debug)]
struct MetricsEndpoint(Registry);

impl Handler for MetricsEndpoint {
    async fn handle(&self, request: Request<Incoming>, _: SocketAddr) -> Response<Body> {
        if request.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "not found: try /metrics\n");
        }
        let mut encoded = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut encoded, &self.0);
        respond(StatusCode::OK, OPENMETRICS, Bytes::from(encoded))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        args: CaArgs,
    }

    fn parse(extra: &[&str]) -> Result<CaArgs, clap::Error> {
        let args = ["ambit-ca", "--ca-dir", "/etc/cacerts"];
        Command::try_parse_from(args.iter().chain(extra)).map(|command| command.args)
    }

    #[test]
    fn defaults_are_istios() {
        let config = CaConfig::try_from(parse(&[]).unwrap()).unwrap();
        assert_eq!(config.listen, "0.0.0.0:15012".parse().unwrap());
        assert_eq!(config.metrics_addr, "0.0.0.0:15014".parse().unwrap());
        let server = config.server;
        assert_eq!(server.trust_domain.as_str(), "cluster.local");
        assert_eq!(
            (server.audience.as_str(), server.cluster_id.as_str()),
            ("istio-ca", "Kubernetes")
        );
        assert_eq!(
            server.trusted_node_accounts,
            ["ambit-system/ambit".parse().unwrap()]
        );
        assert_eq!(
            server.server_names,
            ["ambit-ca.ambit-system.svc".parse().unwrap()]
        );
        assert_eq!(server.create_root, CreateRoot::Never);
        assert_eq!(server.root_configmap, None);
    }

    #[test]
    fn the_roots_configmap_and_the_root_secret_are_in_the_namespace() {
        let args = parse(&[
            "--create-root",
            "--root-secret",
            "cacerts",
            "--root-configmap",
            "ambit-ca-root-cert",
            "--namespace",
            "mesh",
        ])
        .unwrap();
        let server = CaConfig::try_from(args).unwrap().server;
        let named = |name: &str| NamespacedName {
            namespace: "mesh".parse().unwrap(),
            name: name.parse().unwrap(),
        };
        assert_eq!(server.create_root, CreateRoot::KeptIn(named("cacerts")));
        assert_eq!(server.root_configmap, Some(named("ambit-ca-root-cert")));

        let args = parse(&["--create-root"]).unwrap();
        let server = CaConfig::try_from(args).unwrap().server;
        assert_eq!(server.create_root, CreateRoot::InDir);
    }

    #[test]
    fn the_root_secret_needs_create_root_and_both_need_a_namespace() {
        for (extra, missing) in [
            (
                &["--root-secret", "cacerts", "--namespace", "mesh"][..],
                "--create-root",
            ),
            (
                &["--create-root", "--root-secret", "cacerts"][..],
                "--namespace",
            ),
            (
                &["--root-configmap", "ambit-ca-root-cert"][..],
                "--namespace",
            ),
        ] {
            let error = parse(extra).unwrap_err().to_string();
            assert!(error.contains(missing), "{extra:?}: {error}");
        }
    }

    #[test]
    fn lists_are_comma_separated() {
        let args = parse(&[
            "--trusted-node-accounts",
            "ambit-system/ambit,kube-system/ztunnel",
            "--server-names",
            "localhost,127.0.0.1",
        ])
        .unwrap();
        assert_eq!(args.trusted_node_accounts.len(), 2);
        assert_eq!(args.server_names.len(), 2);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flag, value) in [
            ("--trusted-node-accounts", "ambit"),
            ("--server-names", "not a name"),
            ("--trust-domain", "Not/A/Domain"),
            ("--max-ttl", "1w"),
            ("--root-configmap", "Root_Cert"),
            ("--namespace", "a/b"),
        ] {
            let error = parse(&[flag, value]).unwrap_err().to_string();
            assert!(error.contains(flag), "{flag}: {error}");
        }
        let args = parse(&["--default-ttl", "48h", "--max-ttl", "24h"]).unwrap();
        let error = CaConfig::try_from(args).unwrap_err().to_string();
        assert!(error.contains("--default-ttl"), "{error}");
    }
}
