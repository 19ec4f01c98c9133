//! The agent's node-level listeners (readiness, metrics, admin, the CNI plugin's socket and the
//! hand-over socket): handed over by the agent this one replaces, or bound anew.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::SockRef;
use tokio::net::{TcpListener, UnixListener};

use crate::cni_server;
use crate::config::{AgentConfig, SourceConfig};
use crate::handover::Predecessor;
use crate::handover::wire::{self, Channel, NodeListener};

/// How long an agent that stopped its predecessor waits for it to let go of the node's ports.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct NodeListeners {
    pub(crate) readiness: TcpListener,
    pub(crate) metrics: TcpListener,
    pub(crate) admin: TcpListener,
    pub(crate) cni: Option<UnixListener>,
    pub(crate) handover: wire::Listener,
}

impl NodeListeners {
    /// Takes each listener from `predecessor` where it handed over one at the configured
    /// address, and binds the others.
    pub(crate) async fn open(
        config: &AgentConfig,
        mut predecessor: Option<&mut Predecessor>,
    ) -> anyhow::Result<Self> {
        // A predecessor that was stopped may still be closing its listeners.
        let patience = if predecessor.is_some() {
            RELEASE_TIMEOUT
        } else {
            Duration::ZERO
        };
        let mut handed = |which| predecessor.as_mut().and_then(|p| p.listener(which));
        let readiness = tcp(
            "--readiness-addr",
            config.readiness_addr,
            handed(NodeListener::Readiness),
            patience,
        )
        .await?;
        let metrics = tcp(
            "--metrics-addr",
            config.metrics_addr,
            handed(NodeListener::Metrics),
            patience,
        )
        .await?;
        let admin = tcp(
            "--admin-addr",
            config.admin_addr,
            handed(NodeListener::Admin),
            patience,
        )
        .await?;
        let cni = match &config.source {
            SourceConfig::Kubernetes {
                cni_socket: Some(path),
                ..
            } => Some(cni(path, handed(NodeListener::Cni)).context("--cni-socket")?),
            _ => None,
        };
        let handover = handover(&config.handover_socket, handed(NodeListener::Handover))
            .with_context(|| format!("--handover-socket {}", config.handover_socket.display()))?;
        Ok(Self {
            readiness,
            metrics,
            admin,
            cni,
            handover,
        })
    }

    /// Duplicates of every listener, for a successor.
    pub(crate) fn duplicates(&self) -> io::Result<Vec<(NodeListener, OwnedFd)>> {
        let mut listeners = vec![
            (
                NodeListener::Readiness,
                self.readiness.as_fd().try_clone_to_owned()?,
            ),
            (
                NodeListener::Metrics,
                self.metrics.as_fd().try_clone_to_owned()?,
            ),
            (
                NodeListener::Admin,
                self.admin.as_fd().try_clone_to_owned()?,
            ),
            (
                NodeListener::Handover,
                self.handover.as_fd().try_clone_to_owned()?,
            ),
        ];
        if let Some(cni) = &self.cni {
            listeners.push((NodeListener::Cni, cni.as_fd().try_clone_to_owned()?));
        }
        Ok(listeners)
    }
}

/// The listener handed over on `addr`, else a new one, tried for up to `patience` while the
/// address is in use.
async fn tcp(
    flag: &str,
    addr: SocketAddr,
    handed: Option<OwnedFd>,
    patience: Duration,
) -> anyhow::Result<TcpListener> {
    if let Some(fd) = handed {
        let listener = std::net::TcpListener::from(fd);
        let listening = SockRef::from(&listener).is_listener().unwrap_or(false);
        if listening && listener.local_addr().ok() == Some(addr) {
            listener.set_nonblocking(true)?;
            return Ok(TcpListener::from_std(listener)?);
        }
        tracing::warn!(flag, %addr, "the listener handed over is not on this address; listening anew");
    }
    let deadline = Instant::now() + patience;
    loop {
        match TcpListener::bind(addr).await {
            Err(error) if error.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bound => return bound.with_context(|| format!("{flag} {addr}")),
        }
    }
}

/// The CNI plugin's socket: the one handed over at `path`, else a new one.
fn cni(path: &Path, handed: Option<OwnedFd>) -> anyhow::Result<UnixListener> {
    if let Some(fd) = handed {
        let listener = StdUnixListener::from(fd);
        let at = listener.local_addr().ok();
        if at.as_ref().and_then(|a| a.as_pathname()) == Some(path) {
            listener.set_nonblocking(true)?;
            return Ok(UnixListener::from_std(listener)?);
        }
        tracing::warn!(socket = %path.display(), "the CNI socket handed over is elsewhere; listening anew");
    }
    Ok(cni_server::bind(path)?)
}

/// The hand-over socket: the one handed over, else a new one at `path`, unless an agent answers
/// there: it would be cut off from its successor.
fn handover(path: &Path, handed: Option<OwnedFd>) -> anyhow::Result<wire::Listener> {
    if let Some(fd) = handed {
        return Ok(wire::Listener::from_fd(fd)?);
    }
    match Channel::connect(path) {
        Ok(_) => anyhow::bail!(
            "an agent already runs here: start this one with --take-over to replace it"
        ),
        Err(error) if error.is_absent() => {}
        Err(error) => return Err(error.into()),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).context("creating its directory")?;
    }
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            return Err(error).context("removing the socket an earlier agent left");
        }
        _ => {}
    }
    Ok(wire::Listener::bind(path)?)
}
