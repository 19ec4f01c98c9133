//! The composition root: builds the agent from its configuration and runs it until a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_ca::client::CaClient;
use ambit_dns::{Forwarder, Proxy};
use ambit_identity::{CertificateManager, CertificateProvider, LocalCa, TrustDomain};
use ambit_redirect::{CaptureBackend, Ebpf, HostProc, NetSysctls, Nftables};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::views::EffectiveConfig;
use crate::admin::{AdminApi, EgressContext, MetricsEndpoint};
use crate::admission::Admission;
use crate::balance::Balancer;
use crate::cni_server::CniServer;
use crate::config::{AgentConfig, CaConfig, RedirectKind, SourceConfig};
use crate::dns::NodeDns;
use crate::drain::{self, DrainTrigger, DrainWatcher};
use crate::enrolment::{CaptureStatus, Discovery, Enrolment, PassListing};
use crate::error_chain::ErrorChain;
use crate::handover::{self, HandoverMetrics, HandoverServer, HandoverStatus, Predecessor};
use crate::hbone::{ClientSettings, HboneClient};
use crate::http_server;
use crate::logging::Logging;
use crate::node_listeners::NodeListeners;
use crate::readiness::Readiness;
use crate::revocation::Revocations;
use crate::sandboxes::Sandboxes;
use crate::source::{FileSource, KubernetesSource, Source};
use crate::state::ClusterState;
use crate::telemetry::{self, Metrics, Telemetry};

/// How long the control plane gets to finish what it is doing once the data plane drained.
const CONTROL_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs the node agent until SIGTERM or SIGINT, or until a successor replaces it, then drains
/// it.
pub(crate) async fn run(config: AgentConfig, logging: Logging) -> anyhow::Result<()> {
    raise_file_limit();
    let mut stop = StopSignals::install()?;
    let certificates = Arc::new(CertificateManager::new(certificate_provider(
        &config.ca,
        &config.trust_domain,
        config.certificate_ttl,
    )?));
    let (source, discovery) = open_source(&config).await?;
    let capture = capture_backend(config.redirect, &config.host_proc)?;
    let capture_name = capture.name();
    let mut metrics = Metrics::new();
    let handover_metrics = HandoverMetrics::register(metrics.ambit_registry());
    let sandboxes = discovery.sandboxes().cloned();
    let mut predecessor = match config.take_over {
        true => handover::take_over(
            &config.handover_socket,
            capture_name,
            &handover_metrics,
            sandboxes.as_ref(),
        )
        .await
        .context("--take-over")?,
        false => None,
    };
    let listeners = NodeListeners::open(&config, predecessor.as_mut()).await?;
    let handed_listeners = listeners
        .duplicates()
        .context("duplicating the node's listeners")?;

    let client = HboneClient::new(certificates.clone(), ClientSettings::default());
    metrics.register_node(certificates.clone(), client.clone(), capture.clone());
    let forwarder = Forwarder::from_resolv_conf(&config.dns_upstream).context("--dns-upstream")?;
    let dns = Arc::new(NodeDns::new(
        Proxy::new(forwarder, metrics.register_dns()),
        &config.cluster_domain,
        config.dns_limits,
    ));
    let admission = Arc::new(Admission::new(
        config.pending_limits,
        metrics.ambit_registry(),
    ));
    metrics.register_logging(logging.dropped);
    let telemetry = Arc::new(Telemetry::new(
        metrics,
        config.baseline_learn,
        config.cluster_id.clone(),
    ));
    let handover_status = Arc::new(HandoverStatus::new(capture_name));

    // The data plane drains first. The control plane keeps working meanwhile and stops after
    // it: the source and revocation, so that a policy change still closes draining connections
    // it denies. The node's listeners stop with it, or at once when a successor takes them.
    let (trigger, watcher) = drain::channel();
    let (control_trigger, control) = drain::channel();
    let (listeners_trigger, listeners_watcher) = drain::channel();
    let (states, states_rx) = watch::channel(Arc::new(ClusterState::default()));
    let (capture_status, capture_status_rx) = watch::channel(CaptureStatus::new());
    // Made before the source runs, so that its first state counts as a change.
    let mut first_state = states_rx.clone();
    let source = tokio::spawn(source.run(states, capture_status_rx.clone(), control.clone()));
    let readiness = Readiness::default();
    let balancer = Arc::new(Balancer::new(config.outlier_ejection));
    let admin = AdminApi {
        config: effective_config(&config, capture_name),
        trust_domain: config.trust_domain.clone(),
        states: states_rx.clone(),
        capture: capture_status_rx.clone(),
        certificates: certificates.clone(),
        telemetry: telemetry.clone(),
        balancer: balancer.clone(),
        log_level: logging.level,
        egress: EgressContext {
            default: config.outbound_traffic_policy,
            dns: dns.clone(),
        },
        handover: handover_status.clone(),
    };
    let cni = listeners.cni.map(|listener| {
        let server = discovery.sandboxes().cloned().map(|sandboxes| CniServer {
            sandboxes,
            states: states_rx.clone(),
            capture_status: capture_status_rx.clone(),
            capture: capture.clone(),
        });
        (server, listener)
    });
    let servers = HttpServers {
        readiness: (listeners.readiness, readiness.clone()),
        metrics: (listeners.metrics, MetricsEndpoint::new(telemetry.clone())),
        admin: (listeners.admin, admin),
    };
    // While a predecessor still accepts on the listeners it handed over, it answers them: this
    // agent serves them once it has taken over.
    let taking_over = predecessor.as_ref().is_some_and(|p| !p.was_stopped());
    let mut servers = Some(servers);
    if !taking_over && let Some(servers) = servers.take() {
        servers.spawn(listeners_watcher.clone());
    }

    // Nothing is enrolled, and readiness stays off, until the source has the whole cluster: a
    // state without its policies would let through what they deny.
    tokio::select! {
        changed = first_state.changed() => changed.context("the source stopped before it read the cluster")?,
        () = stop.received() => {
            tracing::info!("stopped before the source read the cluster");
            return Ok(());
        }
    }
    if let Some((Some(server), listener)) = cni {
        tokio::spawn(server.serve(listener, listeners_watcher.clone()));
    }
    tokio::spawn(telemetry::remove_departed(
        telemetry.clone(),
        states_rx.clone(),
        config.metrics_series_grace,
        control,
    ));
    // Ends with the source.
    let revocations = Arc::new(Revocations::default());
    tokio::spawn(revocations.clone().run(states_rx.clone()));
    let (offers, offer_requests) = mpsc::channel(1);
    let (captured, all_captured) = oneshot::channel();
    let enrolment = Enrolment {
        node: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        capture: capture.clone(),
        discovery,
        client,
        certificates,
        states: states_rx,
        readiness: readiness.clone(),
        telemetry: telemetry.clone(),
        admission,
        revocations,
        balancer,
        status: capture_status,
        dns,
        outbound_policy: config.outbound_traffic_policy,
        handed_over: predecessor
            .as_ref()
            .map(Predecessor::pods)
            .unwrap_or_default(),
        captured: Some(captured),
        offers: offer_requests,
    };
    tokio::spawn(enrolment.run(watcher));
    tracing::info!(node = config.node, capture = capture_name, "agent started");

    if let Some(mut predecessor) = predecessor {
        // Every pod is enrolled, on the listeners handed over, before the predecessor stops
        // accepting on them.
        if taking_over {
            tokio::select! {
                captured = all_captured => captured.context("enrolment stopped before the pods were captured")?,
                gone = predecessor.gave_up() => return Err(gone).context("the running agent gave up waiting to be taken over; it carries on"),
                () = stop.received() => {
                    tracing::info!("stopped before taking over; the running agent carries on");
                    return Ok(());
                }
            }
        }
        predecessor
            .confirm(&handover_metrics)
            .await
            .context("the running agent gave up waiting to be taken over; it carries on")?;
        // Connections that arrived meanwhile wait in the listeners' queues.
        if let Some(servers) = servers.take() {
            servers.spawn(listeners_watcher.clone());
        }
        tokio::spawn(predecessor.follow(handover_status, handover_metrics.clone()));
    }
    let (replaced, mut replaced_by) = watch::channel(None);
    let handover_server = HandoverServer {
        capture,
        sandboxes,
        listeners: handed_listeners,
        enrolment: offers,
        readiness: readiness.clone(),
        telemetry,
        metrics: handover_metrics,
        drain_timeout: config.drain_timeout,
    };
    tokio::spawn(handover_server.serve(listeners.handover, replaced));
    drop(listeners_watcher);

    // The source runs until the drain: if it ends before, the agent would go on with a frozen
    // view of the cluster. It exits instead; capture stays in place, failing closed, until it
    // is restarted.
    // Signals that end the drain at once: the second; once replaced, the second after it (the
    // successor's rollout sends one as it deletes this agent's pod, which must not cut the drain
    // short).
    let mut cut_short_after = 1;
    tokio::select! {
        () = stop.received() => {}
        Ok(_) = replaced_by.wait_for(Option::is_some) => cut_short_after = 2,
        ended = source => return Err(match ended {
            Err(error) if error.is_panic() => anyhow::anyhow!("the source panicked"),
            _ => anyhow::anyhow!("the source stopped"),
        }),
    }
    // The node's listeners close once a successor has them, or has stopped this agent (also
    // while it drains), and otherwise with the process.
    tokio::spawn(async move {
        let replaced = cut_short_after == 2;
        if replaced || replaced_by.wait_for(Option::is_some).await.is_ok() {
            listeners_trigger.drain().await;
        }
    });
    shut_down(
        config.drain_timeout,
        &mut stop,
        &readiness,
        (trigger, cut_short_after),
        control_trigger,
    )
    .await
}

/// Where workload certificates come from: the CA at `--ca-addr`, or a CA key in this process,
/// issuing for `ttl`.
pub(crate) fn certificate_provider(
    ca: &CaConfig,
    trust_domain: &TrustDomain,
    ttl: Duration,
) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    Ok(match ca {
        CaConfig::Remote(remote) => Arc::new(CaClient::new(remote.clone())),
        CaConfig::Local(dir) => Arc::new(
            LocalCa::load_or_create(dir, trust_domain)
                .with_context(|| format!("--ca-dir {}", dir.display()))?
                .with_workload_ttl(ttl),
        ),
    })
}

/// The source `--source` names, and how pods' namespaces are found with it: by their processes
/// in a cluster, by their address in the file source's lab (its pods have no processes).
async fn open_source(config: &AgentConfig) -> anyhow::Result<(Source, Discovery)> {
    let (source, sandboxes) =
        connect_source(&config.source, &config.node, &config.root_namespace).await?;
    let discovery = match sandboxes {
        Some(sandboxes) => Discovery::InCluster {
            sandboxes,
            host_proc: HostProc::new(&config.host_proc),
            processes: PassListing::default(),
        },
        None => Discovery::ByAddress(PassListing::default()),
    };
    Ok((source, discovery))
}

/// The source `config` names, for `node`, with the sandboxes the CNI plugin reports to the
/// `kubernetes` source.
pub(crate) async fn connect_source(
    config: &SourceConfig,
    node: &str,
    root_namespace: &str,
) -> anyhow::Result<(Source, Option<Sandboxes>)> {
    Ok(match config {
        SourceConfig::File(path) => {
            let source = FileSource::new(path, root_namespace);
            let initial = source
                .load()
                .with_context(|| format!("--config {}", path.display()))?;
            (Source::File(source, Box::new(initial)), None)
        }
        SourceConfig::Kubernetes { kubeconfig, .. } => {
            let sandboxes = Sandboxes::default();
            let source = KubernetesSource::connect(
                kubeconfig.as_deref(),
                node,
                root_namespace,
                sandboxes.clone(),
            )
            .await
            .context("--source kubernetes")?;
            (Source::Kubernetes(source), Some(sandboxes))
        }
    })
}

/// SIGTERM and SIGINT, installed once, before anything is worth stopping cleanly.
pub(crate) struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub(crate) fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    pub(crate) async fn received(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Drains, once asked to stop (or replaced): readiness off, the data plane's connections given
/// `deadline` to finish (`cut_short_after` signals end that at once), then the control plane
/// stopped.
async fn shut_down(
    deadline: Duration,
    stop: &mut StopSignals,
    readiness: &Readiness,
    (data_plane, cut_short_after): (DrainTrigger, usize),
    control_plane: DrainTrigger,
) -> anyhow::Result<()> {
    readiness.drain();
    tracing::info!(
        ?deadline,
        "draining: no new connections; open ones may finish"
    );
    tokio::select! {
        drained = tokio::time::timeout(deadline, data_plane.drain()) => match drained {
            Ok(()) => tracing::info!("drained"),
            Err(_) => tracing::warn!(?deadline, "connections still open at the drain deadline; closing them"),
        },
        () = async {
            for _ in 0..cut_short_after {
                stop.received().await;
            }
        } => tracing::warn!("asked again to stop; closing the open connections"),
    }
    let _ = tokio::time::timeout(CONTROL_SHUTDOWN_GRACE, control_plane.drain()).await;
    Ok(())
}

/// The agent's HTTP servers, each with its listener.
struct HttpServers {
    readiness: (TcpListener, Readiness),
    metrics: (TcpListener, MetricsEndpoint),
    admin: (TcpListener, AdminApi),
}

impl HttpServers {
    fn spawn(self, control: DrainWatcher) {
        let (listener, readiness) = self.readiness;
        tokio::spawn(http_server::serve(
            listener,
            control.clone(),
            "readiness",
            readiness,
        ));
        let (listener, metrics) = self.metrics;
        tokio::spawn(http_server::serve(
            listener,
            control.clone(),
            "metrics",
            metrics,
        ));
        let (listener, admin) = self.admin;
        tokio::spawn(http_server::serve(listener, control, "admin", admin));
    }
}

/// Raises the soft limit on open files to the hard limit: every proxied connection holds one
/// or two descriptors.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard
                && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            {
                tracing::warn!(soft, hard, %error, "failed to raise the open-file limit");
                return;
            }
            tracing::info!(was = soft, now = hard, hard, "open-file limit");
        }
        Err(error) => tracing::warn!(%error, "failed to read the open-file limit"),
    }
}

/// The capture backend `--redirect` asks for: eBPF must work when asked for by name; `auto`
/// falls back to nftables, saying why. Pods' sysctls are written through the host's procfs:
/// the container's own `/proc/sys` is read-only.
fn capture_backend(
    redirect: RedirectKind,
    host_proc: &Path,
) -> anyhow::Result<Arc<dyn CaptureBackend>> {
    let sysctls = NetSysctls::new(host_proc.join("sys/net"));
    Ok(match redirect {
        RedirectKind::Nftables => Arc::new(Nftables::new(sysctls)),
        RedirectKind::Ebpf => Arc::new(Ebpf::new(sysctls).context("--redirect ebpf")?),
        RedirectKind::Auto => match Ebpf::new(sysctls.clone()) {
            Ok(ebpf) => Arc::new(ebpf),
            Err(unavailable) => {
                tracing::warn!(reason = %ErrorChain(&unavailable), "eBPF capture unavailable; capturing with nftables");
                Arc::new(Nftables::new(sysctls))
            }
        },
    })
}

pub(crate) async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag} {addr}"))
}

fn effective_config(config: &AgentConfig, capture: &str) -> EffectiveConfig {
    let (source, config_file, kubeconfig, cni_socket) = match &config.source {
        SourceConfig::File(path) => ("file", Some(path), None, None),
        SourceConfig::Kubernetes {
            kubeconfig,
            cni_socket,
        } => ("kubernetes", None, kubeconfig.as_ref(), cni_socket.as_ref()),
    };
    let display = |path: &PathBuf| path.display().to_string();
    EffectiveConfig {
        node: config.node.clone(),
        source: source.to_owned(),
        config_file: config_file.map(display),
        kubeconfig: kubeconfig.map(display),
        cni_socket: cni_socket.map(display),
        host_proc: display(&config.host_proc),
        ca_dir: match &config.ca {
            CaConfig::Local(dir) => Some(display(dir)),
            CaConfig::Remote(_) => None,
        },
        ca_addr: match &config.ca {
            CaConfig::Local(_) => None,
            CaConfig::Remote(remote) => Some(remote.address.to_string()),
        },
        certificate_ttl_seconds: config.certificate_ttl.as_secs(),
        trust_domain: config.trust_domain.to_string(),
        root_namespace: config.root_namespace.clone(),
        redirect: format!("{:?}", config.redirect).to_lowercase(),
        capture: capture.to_owned(),
        readiness_addr: config.readiness_addr,
        metrics_addr: config.metrics_addr,
        admin_addr: config.admin_addr,
        baseline_learn_seconds: config.baseline_learn.as_secs(),
        metrics_series_grace_seconds: config.metrics_series_grace.as_secs(),
        log_format: format!("{:?}", config.log_format).to_lowercase(),
        drain_timeout_seconds: config.drain_timeout.as_secs(),
        handover_socket: display(&config.handover_socket),
        take_over: config.take_over,
        handshake_timeout_seconds: config.pending_limits.handshake_timeout.as_secs(),
        max_pending_connections: config.pending_limits.node,
        max_pending_per_source: config.pending_limits.per_source,
        outbound_traffic_policy: config.outbound_traffic_policy.as_str().to_owned(),
        cluster_domain: config.cluster_domain.clone(),
        dns_upstream: display(&config.dns_upstream),
        dns_queries_per_second: config.dns_limits.queries_per_second,
    }
}
