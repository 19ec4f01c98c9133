//! `ambit agent`'s flags, and the checked configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;

use ambit_identity::{IdentityError, TrustDomain};
use clap::{Args, ValueEnum};

/// Where the agent learns about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A multi-document YAML file of Kubernetes objects (`--config`), reloaded on change.
    File,
}

/// How pod traffic is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedirectKind {
    /// One nftables table per pod network namespace (TPROXY and REDIRECT).
    Nftables,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `ambit agent`; each can also be set with its `AMBIT_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The node this agent runs on: its enrolled pods are the ones it captures.
    #[arg(long, env = "AMBIT_NODE")]
    pub node: String,
    /// Where the cluster's objects come from.
    #[arg(long, env = "AMBIT_SOURCE", value_enum, default_value = "file")]
    pub source: SourceKind,
    /// The YAML file the `file` source reads.
    #[arg(long, env = "AMBIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The local CA's directory, in Istio's `cacerts` layout; a self-signed root is created in
    /// it when it is empty.
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub ca_dir: PathBuf,
    /// The SPIFFE trust domain of this cluster.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The namespace whose policies apply to the whole mesh, as Istio's root namespace.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// How pod traffic is captured.
    #[arg(long, env = "AMBIT_REDIRECT", value_enum, default_value = "nftables")]
    pub redirect: RedirectKind,
    /// Where readiness (`/healthz/ready`) is served.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Why the flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--source file needs --config FILE")]
    MissingConfigFile,
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] IdentityError),
}

/// The agent's checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub config_file: PathBuf,
    pub ca_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub root_namespace: String,
    pub redirect: RedirectKind,
    pub readiness_addr: SocketAddr,
}

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = ConfigError;

    fn try_from(args: AgentArgs) -> Result<Self, Self::Error> {
        let SourceKind::File = args.source;
        Ok(Self {
            config_file: args.config.ok_or(ConfigError::MissingConfigFile)?,
            trust_domain: args
                .trust_domain
                .parse()
                .map_err(ConfigError::TrustDomain)?,
            node: args.node,
            ca_dir: args.ca_dir,
            root_namespace: args.root_namespace,
            redirect: args.redirect,
            readiness_addr: args.readiness_addr,
        })
    }
}
