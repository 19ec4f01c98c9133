//! The agent's side of the CNI plugin: a Unix socket on which `ambit-cni` asks, while the
//! container runtime creates a pod's sandbox, that the pod be captured before any of its
//! containers runs. The answer to an ADD comes only once capture is in place, or once the pod is
//! known to be outside the mesh.
//!
//! Enrolment itself stays with the enrolment loop: the server records the sandbox (its network
//! namespace and addresses), the source gives the pod those addresses until the API server has
//! them, and the loop captures it in that namespace, whichever of the two paths comes first.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_cni::{Command, MAX_MESSAGE_BYTES, Message, Reply, Request};
use ambit_redirect::{CaptureBackend, Netns, NetnsError, NetnsId, PodNetns};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::drain::DrainWatcher;
use crate::enrolment::{Capture, CaptureStatus};
use crate::error_chain::ErrorChain;
use crate::sandboxes::{Sandbox, Sandboxes};
use crate::state::{ClusterState, Protocol, WorkloadUid};

/// How long a request may take, under the plugin's own 30 s: a pod that cannot be captured in
/// time fails its ADD, and the runtime creates its sandbox again.
const DEADLINE: Duration = Duration::from_secs(25);

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CniServerError {
    #[error("failed to create the directory of {}", .0.display())]
    Directory(PathBuf, #[source] io::Error),
    #[error("failed to listen on {}", .0.display())]
    Bind(PathBuf, #[source] io::Error),
}

/// What answering a request needs.
#[derive(Debug, Clone)]
pub(crate) struct CniServer {
    pub(crate) sandboxes: Sandboxes,
    pub(crate) states: watch::Receiver<Arc<ClusterState>>,
    pub(crate) capture_status: watch::Receiver<CaptureStatus>,
    pub(crate) capture: Arc<dyn CaptureBackend>,
}

/// Listens on `path`, in place of any socket an earlier agent left there.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, CniServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CniServerError::Directory(path.to_owned(), e))?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| CniServerError::Bind(path.to_owned(), e))
}

impl CniServer {
    /// Answers the plugin until a drain starts.
    pub(crate) async fn serve(self, listener: UnixListener, mut drain: DrainWatcher) {
        loop {
            let stream = tokio::select! {
                () = drain.signaled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "CNI socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(self.clone().answer(stream));
        }
    }

    async fn answer(self, stream: UnixStream) {
        let (reader, mut writer) = stream.into_split();
        let mut line = String::new();
        // One bounded line: a peer cannot make the agent buffer more.
        let limit = u64::try_from(MAX_MESSAGE_BYTES).unwrap_or(u64::MAX);
        let mut reader = BufReader::new(reader.take(limit));
        let read = reader.read_line(&mut line);
        let reply = match tokio::time::timeout(DEADLINE, read).await {
            Ok(Ok(_)) => match Request::from_line(&line) {
                Ok(request) => self.decide(request).await,
                Err(error) => Reply::Failed {
                    error: format!("malformed request: {}", ErrorChain(&error)),
                },
            },
            Ok(Err(error)) => Reply::Failed {
                error: format!("reading the request: {error}"),
            },
            Err(_) => return,
        };
        if let Ok(line) = reply.to_line() {
            let _ = writer.write_all(line.as_bytes()).await;
        }
    }

    async fn decide(&self, request: Request) -> Reply {
        let uid = WorkloadUid(request.pod.uid.clone());
        let pod = format!("{}/{}", request.pod.namespace, request.pod.name);
        let reply = match request.command {
            Command::Add => {
                let Some(ip) = request.ips.first().copied() else {
                    return Reply::Failed {
                        error: "the runtime gave the pod no IP".to_owned(),
                    };
                };
                self.sandboxes.created(
                    uid.clone(),
                    Sandbox {
                        namespace: request.pod.namespace.clone(),
                        name: request.pod.name.clone(),
                        netns: request.netns.clone(),
                        ips: request.ips.clone(),
                    },
                );
                let netns = match Netns::open(&request.netns) {
                    Ok(netns) => netns.id(),
                    Err(error) => {
                        return Reply::Failed {
                            error: ErrorChain(&error).to_string(),
                        };
                    }
                };
                tokio::time::timeout(DEADLINE, self.captured(&uid, ip, netns))
                    .await
                    .unwrap_or_else(|_| Reply::Failed {
                        error: format!(
                            "the pod was not captured within {}s (is it in the cluster state yet?)",
                            DEADLINE.as_secs()
                        ),
                    })
            }
            Command::Del => {
                self.sandboxes.torn_down(&uid);
                Reply::Released
            }
            Command::Check => self.check(&uid, &request.netns).await,
        };
        tracing::info!(pod, command = ?request.command, ?reply, "CNI request");
        reply
    }

    /// Waits until the enrolment loop has captured the pod in this sandbox's namespace (not
    /// merely in an earlier sandbox of the same pod), or the state says it is not in the mesh.
    async fn captured(&self, uid: &WorkloadUid, ip: IpAddr, netns: NetnsId) -> Reply {
        let (mut states, mut status) = (self.states.clone(), self.capture_status.clone());
        let mut captures = self.sandboxes.subscribe_captures();
        loop {
            captures.borrow_and_update();
            if self.sandboxes.captured_in(uid) == Some(netns) {
                return Reply::Captured;
            }
            if let Some(Capture::Failed(error) | Capture::Refused(error)) =
                status.borrow_and_update().get(uid)
            {
                return Reply::Failed {
                    error: error.clone(),
                };
            }
            let outside = states
                .borrow_and_update()
                .workload_by_ip(ip)
                .is_some_and(|w| w.uid == *uid && w.protocol == Protocol::Tcp);
            if outside {
                return Reply::NotInMesh;
            }
            tokio::select! {
                changed = states.changed() => if changed.is_err() { break },
                changed = status.changed() => if changed.is_err() { break },
                changed = captures.changed() => if changed.is_err() { break },
            }
        }
        Reply::Failed {
            error: "the agent is stopping".to_owned(),
        }
    }

    /// Whether the pod's capture is in place in its namespace, as the kernel has it: something
    /// may have removed it behind the agent's back.
    async fn check(&self, uid: &WorkloadUid, netns: &Path) -> Reply {
        match self.capture_status.borrow().get(uid) {
            Some(Capture::Captured(_)) => {}
            Some(Capture::Pending(why) | Capture::Failed(why) | Capture::Refused(why)) => {
                return Reply::Failed {
                    error: format!("not captured: {why}"),
                };
            }
            // Not enrolled: in the mesh or not, there is nothing of ours to check.
            None => return Reply::Checked,
        }
        let capture = self.capture.clone();
        let enabled = async {
            let pod = PodNetns::enter(Netns::open(netns)?)?;
            pod.run(move || capture.is_enabled()).await
        };
        let enabled: Result<Result<bool, _>, NetnsError> = enabled.await;
        match enabled {
            Ok(Ok(true)) => Reply::Checked,
            Ok(Ok(false)) => Reply::Failed {
                error: "the pod's capture is missing from its network namespace".to_owned(),
            },
            Ok(Err(error)) => Reply::Failed {
                error: format!("checking the pod's capture: {}", ErrorChain(&error)),
            },
            Err(error) => Reply::Failed {
                error: format!(
                    "entering the pod's network namespace: {}",
                    ErrorChain(&error)
                ),
            },
        }
    }
}
