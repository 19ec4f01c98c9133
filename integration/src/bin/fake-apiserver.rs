//! `fake-apiserver`: a test double of the Kubernetes API server, serving the objects of a
//! YAML file over HTTPS to kube-rs clients. See `ambit_integration::FakeApiServer`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_integration::{FakeApiServer, FakeApiServerConfig};
use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// A fake Kubernetes API server for tests.
///
/// Serves the objects of a multi-document YAML file (polled: edits become ADDED, MODIFIED and
/// DELETED watch events) over HTTPS with bearer-token authentication. Once listening it writes
/// a kubeconfig; its CA and token live in `<kubeconfig-out>.tls/` and are reused on restart,
/// so clients keep trusting a restarted server. Versions restart ahead of every earlier one,
/// so watchers of a restarted server get 410 Gone and relist.
///
/// `POST /fake/compact` (with the token) drops the event history and ends every watch:
/// watchers re-watch, get 410 Gone and relist.
///
/// Istio's resources are served only while the file holds their
/// CustomResourceDefinition (authorizationpolicies.security.istio.io,
/// peerauthentications.security.istio.io, serviceentries.networking.istio.io).
#[derive(Debug, Parser)]
#[command(name = "fake-apiserver", verbatim_doc_comment)]
struct Args {
    /// The objects file: multi-document YAML of Kubernetes objects.
    #[arg(long, env = "AMBIT_FAKE_APISERVER_OBJECTS")]
    objects: PathBuf,
    /// Where to listen; port 0 picks a free port, which the kubeconfig names.
    #[arg(
        long,
        env = "AMBIT_FAKE_APISERVER_LISTEN",
        default_value = "127.0.0.1:6443"
    )]
    listen: SocketAddr,
    /// The kubeconfig to write (atomically) once the server listens.
    #[arg(long, env = "AMBIT_FAKE_APISERVER_KUBECONFIG_OUT")]
    kubeconfig_out: PathBuf,
    /// Known tokens for TokenReview: a YAML list of {token, username, uid, groups, extra,
    /// audiences, expiresAt}. Read on every review.
    #[arg(long, env = "AMBIT_FAKE_APISERVER_TOKENS")]
    tokens: Option<PathBuf>,
    /// How many changes are kept for watches to resume from.
    #[arg(long, env = "AMBIT_FAKE_APISERVER_HISTORY", default_value_t = 1000)]
    history: usize,
    /// Milliseconds between bookmarks on watches that allow them.
    #[arg(
        long,
        env = "AMBIT_FAKE_APISERVER_BOOKMARK_INTERVAL_MS",
        default_value_t = 1000
    )]
    bookmark_interval_ms: u64,
    /// Milliseconds between checks of the objects file.
    #[arg(
        long,
        env = "AMBIT_FAKE_APISERVER_POLL_INTERVAL_MS",
        default_value_t = 150
    )]
    poll_interval_ms: u64,
    /// Milliseconds watches lag behind each change, as behind a slow watch cache (lists and
    /// gets see it at once).
    #[arg(long, env = "AMBIT_FAKE_APISERVER_WATCH_DELAY_MS", default_value_t = 0)]
    watch_delay_ms: u64,
}

impl From<Args> for FakeApiServerConfig {
    fn from(args: Args) -> Self {
        Self {
            objects: args.objects,
            listen: args.listen,
            kubeconfig_out: args.kubeconfig_out,
            tokens: args.tokens,
            history: args.history,
            bookmark_interval: Duration::from_millis(args.bookmark_interval_ms.max(1)),
            poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
            watch_delay: Duration::from_millis(args.watch_delay_ms),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person: tests and scripts read the log.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let server = FakeApiServer::bind(Args::parse().into())
        .await
        .context("starting the fake API server")?;
    tracing::info!(address = %server.address(), "listening");
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    tokio::select! {
        () = server.run() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
