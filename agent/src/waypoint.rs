//! `ambit waypoint`: the hop in front of the Services and pods that `istio.io/use-waypoint`
//! binds to it. It runs as a pod outside capture, terminates the HBONE tunnels the node agents
//! send it, and carries each on to an endpoint of what the client addressed, over HBONE as its
//! own identity (or plain TCP outside the mesh).

mod exchange;
mod route;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::{CertificateManager, Identity};
use anyhow::Context;
use clap::Args;
use tokio::sync::watch;

use crate::admin::MetricsEndpoint;
use crate::app::{StopSignals, bind, certificate_provider, connect_source};
use crate::balance::Balancer;
use crate::cli::block_on;
use crate::config::{
    CaConfig, CertificateArgs, ClusterArgs, ConfigError, LogFormat, SourceConfig, parse_duration,
};
use crate::drain;
use crate::hbone::{ClientSettings, HboneClient, HboneServer, Keepalive};
use crate::http_server;
use crate::logging;
use crate::state::{ClusterState, WaypointRef};
use crate::telemetry::{Metrics, Telemetry};
use route::Router;

/// Flags of `ambit waypoint`; each can also be set with its `AMBIT_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct WaypointArgs {
    /// The waypoint's name: the Service in front of its pods, as `istio.io/use-waypoint` names
    /// it.
    #[arg(long, env = "AMBIT_WAYPOINT_NAME")]
    pub name: String,
    /// The waypoint's namespace.
    #[arg(long, env = "AMBIT_WAYPOINT_NAMESPACE")]
    pub namespace: String,
    /// The service account the waypoint's pods run as: the identity it proves, which the
    /// workloads behind it admit.
    #[arg(long, env = "AMBIT_WAYPOINT_SERVICE_ACCOUNT")]
    pub service_account: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub certificates: CertificateArgs,
    /// Where HBONE is served.
    #[arg(long, env = "AMBIT_WAYPOINT_LISTEN", default_value = "0.0.0.0:15008")]
    pub listen: SocketAddr,
    /// Where Prometheus metrics (`/metrics`, `/stats/prometheus`) are served: Istio's request
    /// metrics, with `reporter="waypoint"`.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On SIGTERM, how long tunnels get to finish before the waypoint exits.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long an endpoint that failed a connection is left out of the choice, as the node
    /// agent's `--outlier-ejection`.
    #[arg(long, env = "AMBIT_OUTLIER_EJECTION", default_value = "30s", value_parser = parse_duration)]
    pub outlier_ejection: Duration,
}

/// The waypoint's checked configuration.
#[derive(Debug)]
struct WaypointConfig {
    waypoint: WaypointRef,
    identity: Identity,
    source: SourceConfig,
    root_namespace: String,
    cluster_id: String,
    ca: CaConfig,
    certificate_ttl: Duration,
    listen: SocketAddr,
    metrics_addr: SocketAddr,
    drain_timeout: Duration,
    outlier_ejection: Duration,
}

impl TryFrom<WaypointArgs> for WaypointConfig {
    type Error = ConfigError;

    fn try_from(args: WaypointArgs) -> Result<Self, Self::Error> {
        let trust_domain = args.cluster.trust_domain()?;
        let identity = Identity::new(&trust_domain, &args.namespace, &args.service_account)
            .map_err(ConfigError::WaypointIdentity)?;
        let cluster_id = args.cluster.cluster_id()?;
        Ok(Self {
            waypoint: WaypointRef {
                namespace: args.namespace,
                name: args.name,
            },
            identity,
            source: args.cluster.source(None)?,
            root_namespace: args.cluster.root_namespace,
            certificate_ttl: args.certificates.certificate_ttl,
            ca: args.certificates.ca(&cluster_id)?,
            cluster_id,
            listen: args.listen,
            metrics_addr: args.metrics_addr,
            drain_timeout: args.drain_timeout,
            outlier_ejection: args.outlier_ejection,
        })
    }
}

impl WaypointArgs {
    /// Runs the waypoint until SIGTERM or SIGINT.
    pub(crate) fn run(self) -> ExitCode {
        let (_, _flush) = logging::init(self.log_format);
        match WaypointConfig::try_from(self) {
            Ok(config) => block_on(serve(config)),
            Err(error) => {
                tracing::error!("{error}");
                ExitCode::from(2)
            }
        }
    }
}

async fn serve(config: WaypointConfig) -> anyhow::Result<()> {
    let mut stop = StopSignals::install()?;
    let trust_domain = config.identity.trust_domain().clone();
    let provider = certificate_provider(&config.ca, &trust_domain, config.certificate_ttl)?;
    let certificates = Arc::new(CertificateManager::new(provider));
    let (source, _) = connect_source(&config.source, "", &config.root_namespace).await?;
    let listener = bind("--listen", config.listen).await?;
    let metrics_listener = bind("--metrics-addr", config.metrics_addr).await?;

    // Tunnels drain first; the source and the metrics stop after them.
    let (trigger, watcher) = drain::channel();
    let (control_trigger, control) = drain::channel();
    let (states, states_rx) = watch::channel(Arc::new(ClusterState::default()));
    let mut first_state = states_rx.clone();
    let (_, capture) = watch::channel(Default::default());
    let source = tokio::spawn(source.run(states, capture, control.clone()));
    // Nothing is served before the whole cluster is known: routing needs its Services.
    tokio::select! {
        changed = first_state.changed() => changed.context("the source stopped before it read the cluster")?,
        () = stop.received() => return Ok(()),
    }

    let mut metrics = Metrics::new();
    let requests = metrics.register_requests();
    let telemetry = Arc::new(Telemetry::new(metrics, Duration::MAX, config.cluster_id));
    tokio::spawn(http_server::serve(
        metrics_listener,
        control,
        "metrics",
        MetricsEndpoint::new(telemetry.clone()),
    ));
    let router = Router {
        waypoint: config.waypoint.clone(),
        identity: config.identity.clone(),
        states: states_rx,
        balancer: Arc::new(Balancer::new(config.outlier_ejection)),
        client: HboneClient::new(certificates.clone(), ClientSettings::default()),
        telemetry: telemetry.clone(),
        requests,
    };
    let server = HboneServer::with_handler(
        config.identity.clone(),
        certificates,
        Keepalive::default(),
        Arc::new(router),
        telemetry,
    );
    tokio::spawn(server.serve(listener, watcher));
    tracing::info!(
        waypoint = %config.waypoint,
        identity = %config.identity,
        listen = %config.listen,
        metrics = %config.metrics_addr,
        "waypoint serving"
    );

    tokio::select! {
        () = stop.received() => {}
        _ = source => anyhow::bail!("the source stopped"),
    }
    tracing::info!(deadline = ?config.drain_timeout, "draining");
    tokio::select! {
        drained = tokio::time::timeout(config.drain_timeout, trigger.drain()) => {
            if drained.is_err() {
                tracing::warn!("tunnels still open at the drain deadline; closing them");
            }
        }
        () = stop.received() => tracing::warn!("asked again to stop; closing the open tunnels"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), control_trigger.drain()).await;
    Ok(())
}
