//! `ambit agent`'s flags, and the checked configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_identity::{IdentityError, TrustDomain};
use clap::{Args, ValueEnum};

use crate::admission::PendingLimits;
use crate::egress::OutboundTrafficPolicy;

/// Where the agent learns about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A multi-document YAML file of Kubernetes objects (`--config`), reloaded on change.
    File,
    /// The cluster's API server (`--kubeconfig`, or the pod's service account in a cluster).
    Kubernetes,
}

/// How pod traffic is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedirectKind {
    /// eBPF programs in each pod's namespace (tc ingress and sk_lookup) and policy routing.
    Ebpf,
    /// One nftables table per pod network namespace (TPROXY and REDIRECT).
    Nftables,
    /// eBPF where this kernel and these privileges allow it, else nftables.
    Auto,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The cluster and the mesh it runs: flags `ambit agent` and `ambit waypoint` share.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Where the cluster's objects come from.
    #[arg(long, env = "AMBIT_SOURCE", value_enum, default_value = "file")]
    pub source: SourceKind,
    /// The YAML file the `file` source reads.
    #[arg(long, env = "AMBIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The kubeconfig of the `kubernetes` source; in a pod, the service account's in-cluster
    /// configuration is used when it is absent.
    #[arg(long, env = "AMBIT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The name of this cluster: sent to the CA as Istio's `clusterid`, and the value of the
    /// `source_cluster` and `destination_cluster` labels of Istio's metrics.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = ambit_ca::DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// The SPIFFE trust domain of this cluster.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The namespace whose policies apply to the whole mesh, as Istio's root namespace.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
}

/// Where workload certificates come from: flags `ambit agent` and `ambit waypoint` share.
#[derive(Debug, Clone, Args)]
pub struct CertificateArgs {
    /// The local CA's directory, in Istio's `cacerts` layout; a self-signed root is created in
    /// it when it is empty. The agent then holds the mesh's CA key: for labs and demos.
    #[arg(
        long,
        env = "AMBIT_CA_DIR",
        required_unless_present = "ca_addr",
        conflicts_with = "ca_addr"
    )]
    pub ca_dir: Option<PathBuf>,
    /// The certificate authority that signs workload certificates, `https://host:port`:
    /// `ambit ca`, or istiod's CA. Keys stay on the node; only signing requests are sent.
    #[arg(long, env = "AMBIT_CA_ADDR", requires = "ca_root")]
    pub ca_addr: Option<String>,
    /// PEM roots that authenticate the CA at `--ca-addr`; read again when the file changes
    /// (root rotation). Peers are trusted by the roots the CA returns.
    #[arg(long, env = "AMBIT_CA_ROOT", requires = "ca_addr")]
    pub ca_root: Option<PathBuf>,
    /// The service-account token that authenticates this agent to the CA (a projected token
    /// with the CA's audience), read for every request.
    #[arg(
        long,
        env = "AMBIT_CA_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub ca_token: PathBuf,
    /// The name the CA's certificate must carry, when it is not the host of `--ca-addr`.
    #[arg(long, env = "AMBIT_CA_SERVER_NAME", requires = "ca_addr")]
    pub ca_server_name: Option<String>,
    /// How long workload certificates are asked to be valid (the CA may shorten it); they are
    /// renewed at half-life.
    #[arg(long, env = "AMBIT_CERTIFICATE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub certificate_ttl: Duration,
}

/// Flags of `ambit agent`; each can also be set with its `AMBIT_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The node this agent runs on: its enrolled pods are the ones it captures.
    #[arg(long, env = "AMBIT_NODE")]
    pub node: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Where the `kubernetes` source answers the `ambit-cni` plugin, which asks, while a pod's
    /// sandbox is created, that the pod be captured before its containers start.
    #[arg(long, env = "AMBIT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// The host's `/proc`: the `kubernetes` source finds each pod's network namespace there
    /// through the pod's processes (mounted read-only in the DaemonSet), and capture writes pods'
    /// interface sysctls through its `sys/net` (mounted writable in the DaemonSet).
    #[arg(long, env = "AMBIT_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,
    #[command(flatten)]
    pub certificates: CertificateArgs,
    /// How pod traffic is captured.
    #[arg(long, env = "AMBIT_REDIRECT", value_enum, default_value = "ebpf")]
    pub redirect: RedirectKind,
    /// Where readiness (`/healthz/ready`) is served.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Where Prometheus metrics (`/metrics`, `/stats/prometheus`) are served.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Where the admin API is served; it answers loopback clients only, whatever the address.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// How long the traffic baseline learns before it reports edges it never saw (`30s`, `10m`,
    /// `24h`, `7d`).
    #[arg(long, env = "AMBIT_BASELINE_LEARN", default_value = "24h", value_parser = parse_duration)]
    pub baseline_learn: Duration,
    /// How long a workload must have been gone from the cluster before its Istio metric series
    /// are removed (`30s`, `5m`, `1h`); a connection still open keeps its series until it
    /// closes.
    #[arg(long, env = "AMBIT_METRICS_SERIES_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub metrics_series_grace: Duration,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On SIGTERM, how long connections get to finish before the agent exits (a second SIGTERM
    /// ends the wait at once).
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The Unix socket where this agent answers the next one, started beside it to take over.
    #[arg(
        long,
        env = "AMBIT_HANDOVER_SOCKET",
        default_value = "/run/ambit/handover.sock"
    )]
    pub handover_socket: PathBuf,
    /// Take over from the agent running on this node (found at `--handover-socket`): it hands
    /// over its listeners and drains, so that no connection is refused or reset. When it cannot
    /// (another version of the protocol, another `--redirect`), it is stopped instead and the
    /// node's pods fail closed until this agent captures them. With no agent running, starts as
    /// usual.
    #[arg(long, env = "AMBIT_TAKE_OVER")]
    pub take_over: bool,
    /// How long a Service endpoint that failed a connection (refused, timed out, unreachable) is
    /// left out of the choice; each ejection in a row lasts this much longer, up to 5 minutes.
    /// `0s` never ejects.
    #[arg(long, env = "AMBIT_OUTLIER_EJECTION", default_value = "30s", value_parser = parse_duration)]
    pub outlier_ejection: Duration,
    /// How long a client of port 15008 may take for the TLS and HTTP/2 handshakes.
    #[arg(long, env = "AMBIT_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Connections accepted in the node's pods that are not established yet, inbound (handshaking
    /// on 15008, connecting on 15006) and, separately, outbound (connecting on 15001); past this,
    /// new ones are reset at once.
    #[arg(long, env = "AMBIT_MAX_PENDING_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_connections: u32,
    /// The share of those one source IP may hold.
    #[arg(long, env = "AMBIT_MAX_PENDING_PER_SOURCE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_per_source: u32,
    /// Where enrolled pods may connect outside the mesh, as Istio's `outboundTrafficPolicy`:
    /// anywhere, or only to what ServiceEntries list. A namespace's
    /// `ambit.dev/outbound-traffic-policy` label overrides it for its pods.
    #[arg(
        long,
        env = "AMBIT_OUTBOUND_TRAFFIC_POLICY",
        value_enum,
        default_value = "ALLOW_ANY"
    )]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The cluster's DNS domain: the DNS proxy answers `<service>.<namespace>.svc.<domain>`.
    #[arg(long, env = "AMBIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// A resolv.conf naming the servers the DNS proxy forwards to the names the mesh does not
    /// know (its search list is not used).
    #[arg(long, env = "AMBIT_DNS_UPSTREAM", default_value = "/etc/resolv.conf")]
    pub dns_upstream: PathBuf,
    /// DNS queries per second each pod may send the proxy; over UDP, queries beyond it (and a
    /// burst of twice as many) are dropped.
    #[arg(long, env = "AMBIT_DNS_QUERIES_PER_SECOND", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub dns_queries_per_second: u32,
}

/// Why the flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--source file needs --config FILE")]
    MissingConfigFile,
    #[error("--{0} belongs to --source {1}")]
    WrongSource(&'static str, &'static str),
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] IdentityError),
    #[error("workload certificates need either --ca-dir, or --ca-addr with --ca-root")]
    Ca,
    #[error("--ca-addr {0:?} is not an https://host:port URL (istiod and ambit ca serve on 15012)")]
    CaAddress(String),
    #[error("--cluster-id {0:?} cannot be sent in a header")]
    ClusterId(String),
    #[error("--certificate-ttl must be at least {MIN_CERTIFICATE_TTL:?}")]
    CertificateTtl,
    #[error("--namespace and --service-account make no identity")]
    WaypointIdentity(#[source] IdentityError),
}

/// Shorter lifetimes would have certificates renewed faster than the CA answers.
const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(10);

/// Where workload certificates come from, checked.
#[derive(Debug, Clone)]
pub enum CaConfig {
    /// A CA key in this process, from a `cacerts` directory.
    Local(PathBuf),
    /// A certificate authority speaking Istio's protocol.
    Remote(ambit_ca::client::CaClientConfig),
}

/// Where the agent learns about the cluster, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    File(PathBuf),
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// Where the CNI plugin is answered, if it is.
        cni_socket: Option<PathBuf>,
    },
}

/// The agent's checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub source: SourceConfig,
    pub host_proc: PathBuf,
    pub ca: CaConfig,
    pub certificate_ttl: Duration,
    /// This cluster's name: sent to the CA, and the `*_cluster` labels of Istio's metrics.
    pub cluster_id: String,
    pub trust_domain: TrustDomain,
    pub root_namespace: String,
    pub redirect: RedirectKind,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub baseline_learn: Duration,
    pub metrics_series_grace: Duration,
    pub log_format: LogFormat,
    pub drain_timeout: Duration,
    pub handover_socket: PathBuf,
    pub take_over: bool,
    pub outlier_ejection: Duration,
    pub pending_limits: PendingLimits,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    pub cluster_domain: String,
    pub dns_upstream: PathBuf,
    pub dns_limits: ambit_dns::Limits,
}

impl ClusterArgs {
    /// The source the flags name; `cni_socket` is the agent's, for the `kubernetes` source.
    pub(crate) fn source(&self, cni_socket: Option<PathBuf>) -> Result<SourceConfig, ConfigError> {
        match self.source {
            SourceKind::File => {
                if self.kubeconfig.is_some() {
                    return Err(ConfigError::WrongSource("kubeconfig", "kubernetes"));
                }
                if cni_socket.is_some() {
                    return Err(ConfigError::WrongSource("cni-socket", "kubernetes"));
                }
                let path = self.config.clone().ok_or(ConfigError::MissingConfigFile)?;
                Ok(SourceConfig::File(path))
            }
            SourceKind::Kubernetes => {
                if self.config.is_some() {
                    return Err(ConfigError::WrongSource("config", "file"));
                }
                Ok(SourceConfig::Kubernetes {
                    kubeconfig: self.kubeconfig.clone(),
                    cni_socket,
                })
            }
        }
    }

    pub(crate) fn trust_domain(&self) -> Result<TrustDomain, ConfigError> {
        self.trust_domain.parse().map_err(ConfigError::TrustDomain)
    }

    /// The cluster's name, checked: it travels in a header to the CA.
    pub(crate) fn cluster_id(&self) -> Result<String, ConfigError> {
        if http::HeaderValue::from_str(&self.cluster_id).is_err() {
            return Err(ConfigError::ClusterId(self.cluster_id.clone()));
        }
        Ok(self.cluster_id.clone())
    }
}

impl CertificateArgs {
    /// Where certificates come from, asked for in the cluster `cluster_id`.
    pub(crate) fn ca(self, cluster_id: &str) -> Result<CaConfig, ConfigError> {
        if self.certificate_ttl < MIN_CERTIFICATE_TTL {
            return Err(ConfigError::CertificateTtl);
        }
        match (self.ca_dir, self.ca_addr, self.ca_root) {
            (_, Some(address), Some(root_file)) => {
                let uri: http::Uri = address
                    .parse()
                    .map_err(|_| ConfigError::CaAddress(address.clone()))?;
                if uri.scheme_str() != Some("https") || uri.host().is_none() || uri.port().is_none()
                {
                    return Err(ConfigError::CaAddress(address));
                }
                Ok(CaConfig::Remote(ambit_ca::client::CaClientConfig {
                    address: uri,
                    root_file,
                    server_name: self.ca_server_name,
                    token_file: self.ca_token,
                    cluster_id: cluster_id.to_owned(),
                    ttl: self.certificate_ttl,
                }))
            }
            (Some(dir), None, None) => Ok(CaConfig::Local(dir)),
            _ => Err(ConfigError::Ca),
        }
    }
}

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = ConfigError;

    fn try_from(args: AgentArgs) -> Result<Self, Self::Error> {
        let source = args.cluster.source(args.cni_socket)?;
        let cluster_id = args.cluster.cluster_id()?;
        let certificate_ttl = args.certificates.certificate_ttl;
        Ok(Self {
            source,
            ca: args.certificates.ca(&cluster_id)?,
            certificate_ttl,
            trust_domain: args.cluster.trust_domain()?,
            cluster_id,
            node: args.node,
            host_proc: args.host_proc,
            root_namespace: args.cluster.root_namespace,
            redirect: args.redirect,
            readiness_addr: args.readiness_addr,
            metrics_addr: args.metrics_addr,
            admin_addr: args.admin_addr,
            baseline_learn: args.baseline_learn,
            metrics_series_grace: args.metrics_series_grace,
            log_format: args.log_format,
            drain_timeout: args.drain_timeout,
            handover_socket: args.handover_socket,
            take_over: args.take_over,
            outlier_ejection: args.outlier_ejection,
            outbound_traffic_policy: args.outbound_traffic_policy,
            cluster_domain: args.cluster_domain,
            dns_upstream: args.dns_upstream,
            dns_limits: ambit_dns::Limits {
                queries_per_second: args.dns_queries_per_second,
                burst: args.dns_queries_per_second.saturating_mul(2),
                ..ambit_dns::Limits::default()
            },
            pending_limits: PendingLimits {
                node: args.max_pending_connections as usize,
                per_source: args.max_pending_per_source as usize,
                handshake_timeout: args.handshake_timeout,
            },
        })
    }
}

/// A whole number with its unit: `s`, `m`, `h` or `d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration such as 30s, 10m, 24h or 7d");
    let split = text.len().saturating_sub(1);
    let (number, unit) = (text.get(..split).ok_or_else(invalid)?, &text[split..]);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "s", "10", "1.5h", "-1m", "10w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
