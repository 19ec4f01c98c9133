//! The composition root: builds the agent from its configuration and runs it until a signal.

use std::sync::Arc;
use std::time::Duration;

use ambit_identity::{CertificateManager, LocalCa};
use ambit_redirect::{CaptureBackend, Nftables};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{AgentConfig, RedirectKind};
use crate::drain;
use crate::enrolment::Enrolment;
use crate::hbone::{ClientSettings, HboneClient};
use crate::readiness::Readiness;
use crate::source::FileSource;

/// How long connections get to finish once the agent is asked to stop.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the node agent until SIGTERM or SIGINT.
pub(crate) async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let ca = LocalCa::load_or_create(&config.ca_dir, &config.trust_domain)
        .with_context(|| format!("--ca-dir {}", config.ca_dir.display()))?;
    let certificates = Arc::new(CertificateManager::new(Arc::new(ca)));
    let source = FileSource::new(&config.config_file, &config.root_namespace);
    let initial = source
        .load()
        .with_context(|| format!("--config {}", config.config_file.display()))?;
    let capture: Arc<dyn CaptureBackend> = match config.redirect {
        RedirectKind::Nftables => Arc::new(Nftables),
    };
    let readiness_listener = TcpListener::bind(config.readiness_addr)
        .await
        .with_context(|| format!("--readiness-addr {}", config.readiness_addr))?;

    let (trigger, watcher) = drain::channel();
    let (states, states_rx) = watch::channel(Arc::new(initial));
    tokio::spawn(source.watch(states, watcher.clone()));
    let readiness = Readiness::default();
    tokio::spawn(readiness.clone().serve(readiness_listener, watcher.clone()));
    let enrolment = Enrolment {
        node: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        capture,
        client: HboneClient::new(certificates.clone(), ClientSettings::default()),
        certificates,
        states: states_rx,
        readiness,
    };
    tokio::spawn(enrolment.run(watcher));
    tracing::info!(node = config.node, redirect = ?config.redirect, "agent started");

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("draining");
    if !trigger.drain(DRAIN_DEADLINE).await {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open at the drain deadline");
    }
    Ok(())
}
