//! The successor's side: asks the running agent for its listeners, and tells it once it accepts
//! on them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_redirect::{
    CaptureTarget, DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, Netns, OUTBOUND_PORT, PodNetns,
};
use anyhow::Context;
use socket2::{SockRef, Type};

use super::wire::{
    Channel, Message, NodeListener, POD_DESCRIPTORS, POD_SOCKETS, PROTOCOL, WireError,
};
use super::{HandoverMetrics, HandoverStatus, Outcome, PredecessorView, Role};
use crate::error_chain::ErrorChain;
use crate::sandboxes::Sandboxes;
use crate::state::WorkloadUid;

/// How long the predecessor may take for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long it may take to offer: it finishes the enrolment pass under way first.
const OFFER_TIMEOUT: Duration = Duration::from_secs(60);

/// The most pods one offer may hold: a node's worth and more.
const MAX_PODS: u32 = 65_536;

/// The running agent this one takes over from, and what it handed over.
#[derive(Debug)]
pub(crate) struct Predecessor {
    channel: Channel,
    pid: u32,
    /// Whether it handed over; if not, it was asked to stop.
    handed_over: bool,
    /// Its latest drain report: the sockets it carries, and the seconds to its deadline.
    draining: (u64, u64),
    listeners: HashMap<NodeListener, OwnedFd>,
    pods: HandedPods,
}

/// A pod's namespace and listeners as they were handed over.
#[derive(Debug)]
struct HandedPod {
    netns: Netns,
    listeners: CaptureTarget,
}

/// The pods handed over, until the enrolment loop takes each one's listeners.
#[derive(Debug, Clone, Default)]
pub(crate) struct HandedPods(Arc<Mutex<HashMap<WorkloadUid, HandedPod>>>);

impl HandedPods {
    /// The listeners handed over for the pod `uid`, once, if they are the pod's: in `netns`, for
    /// `ip`, each in that namespace on its port. Listeners that are not are refused, with a
    /// warning; the pod then gets new ones.
    pub(crate) fn take(
        &self,
        uid: &WorkloadUid,
        netns: &PodNetns,
        ip: IpAddr,
    ) -> Option<CaptureTarget> {
        let pod = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid)?;
        match pod.check(netns, ip) {
            Ok(()) => Some(pod.listeners),
            Err(reason) => {
                tracing::warn!(workload.uid = %uid, reason, "refusing the listeners handed over for the pod; it is captured anew once the running agent lets go of its ports");
                None
            }
        }
    }

    /// Gives back the listeners of a pod whose enrolment failed, for the next attempt.
    pub(crate) fn put_back(&self, uid: WorkloadUid, netns: &PodNetns, listeners: CaptureTarget) {
        let netns = netns
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())
            .and_then(|fd| Netns::from_fd(fd).map_err(|e| ErrorChain(&e).to_string()));
        match netns {
            Ok(netns) => {
                let pod = HandedPod { netns, listeners };
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(uid, pod);
            }
            Err(error) => {
                tracing::warn!(workload.uid = %uid, error, "failed to keep the listeners handed over for the pod");
            }
        }
    }

    /// Closes the listeners of pods that were not enrolled: how many there were.
    pub(crate) fn forget(&self) -> usize {
        let mut pods = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let left = pods.len();
        pods.clear();
        left
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl HandedPod {
    fn check(&self, netns: &PodNetns, ip: IpAddr) -> Result<(), String> {
        if self.netns.id() != netns.id() {
            return Err(format!(
                "they were handed over in {}, the pod is in {}",
                self.netns.id(),
                netns.id()
            ));
        }
        if self.listeners.pod_ip != ip {
            return Err(format!(
                "they were handed over for {}, the pod has {ip}",
                self.listeners.pod_ip
            ));
        }
        let target = &self.listeners;
        for (name, socket, kind, port) in [
            ("outbound", &target.outbound, Type::STREAM, OUTBOUND_PORT),
            (
                "inbound_plaintext",
                &target.inbound_plaintext,
                Type::STREAM,
                INBOUND_PLAINTEXT_PORT,
            ),
            ("hbone", &target.hbone, Type::STREAM, HBONE_PORT),
            ("dns_udp", &target.dns_udp, Type::DGRAM, DNS_PORT),
            ("dns_tcp", &target.dns_tcp, Type::STREAM, DNS_PORT),
        ] {
            check_socket(socket, kind, port, netns)
                .map_err(|reason| format!("{name}: {reason}"))?;
        }
        Ok(())
    }
}

/// Whether `socket` is of `kind`, bound to `port` in `netns`, and listening if a stream.
fn check_socket(socket: &OwnedFd, kind: Type, port: u16, netns: &PodNetns) -> Result<(), String> {
    let socket_netns = Netns::of_socket(socket.as_fd()).map_err(|e| ErrorChain(&e).to_string())?;
    if socket_netns.id() != netns.id() {
        return Err(format!("it is in {}", socket_netns.id()));
    }
    let socket = SockRef::from(socket);
    let actual = socket.r#type().map_err(|e| e.to_string())?;
    if actual != kind {
        return Err(format!("it is a {actual:?} socket"));
    }
    let local = socket
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .map(|addr: SocketAddr| addr.port());
    if local != Some(port) {
        return Err(format!("it is bound to port {local:?}"));
    }
    if kind == Type::STREAM && !socket.is_listener().map_err(|e| e.to_string())? {
        return Err("it is not listening".to_owned());
    }
    Ok(())
}

/// Asks the agent listening at `path` to hand over. `None` when no agent runs there. When it
/// cannot hand over, it says why and is asked to stop: the predecessor returned then has
/// released its listeners and handed over nothing. Any other answer, or none, is an error: the
/// running agent carries on, and this one must not start beside it.
pub(crate) async fn take_over(
    path: &Path,
    capture: &'static str,
    metrics: &HandoverMetrics,
    sandboxes: Option<&Sandboxes>,
) -> anyhow::Result<Option<Predecessor>> {
    let channel = match Channel::connect(path) {
        Ok(channel) => channel,
        Err(error) if error.is_absent() => {
            tracing::info!(socket = %path.display(), "no running agent to take over from");
            return Ok(None);
        }
        Err(error) => {
            return Err(error).with_context(|| format!("--handover-socket {}", path.display()));
        }
    };
    let hello = Message::Hello {
        protocol: PROTOCOL,
        capture: capture.to_owned(),
        pid: std::process::id(),
    };
    channel.send(&hello, &[]).await.context("saying hello")?;
    let answer = channel
        .receive_within(OFFER_TIMEOUT)
        .await
        .context("waiting for the running agent's offer")?;
    let (reason, pid) = match answer {
        (
            Message::Offer {
                pid,
                pods,
                sandboxes: sandbox_count,
                listeners,
            },
            descriptors,
        ) => {
            let offer = Offer {
                pods,
                sandboxes: sandbox_count,
                listeners: &listeners,
            };
            let (listeners, handed) = offer
                .receive(&channel, descriptors, sandboxes)
                .await
                .context("receiving the running agent's listeners")?;
            let predecessor = Predecessor {
                channel,
                pid,
                handed_over: true,
                draining: (0, 0),
                listeners,
                pods: handed,
            };
            let pods = predecessor.pods.len();
            tracing::info!(
                predecessor.pid = pid,
                pods,
                sandboxes = sandbox_count,
                listeners = predecessor.listeners.len(),
                "received the running agent's listeners"
            );
            metrics.handed_over(Role::Successor, pods, predecessor.sockets());
            return Ok(Some(predecessor));
        }
        (Message::Refused { reason, pid }, _) => (reason, pid),
        (other, _) => anyhow::bail!("the running agent answered {other:?} to hello"),
    };
    metrics.outcome(Role::Successor, Outcome::Refused);
    tracing::warn!(
        reason,
        "cannot take over from the running agent; stopping it instead: its pods fail closed until this agent captures them"
    );
    channel
        .send(&Message::Stop, &[])
        .await
        .context("asking the running agent to stop")?;
    match channel.receive_within(ANSWER_TIMEOUT).await {
        Ok((Message::Released, _)) => {}
        Ok((other, _)) => anyhow::bail!("the running agent answered {other:?} when asked to stop"),
        Err(error) => return Err(error).context("asking the running agent to stop"),
    }
    Ok(Some(Predecessor {
        channel,
        pid,
        handed_over: false,
        draining: (0, 0),
        listeners: HashMap::new(),
        pods: HandedPods::default(),
    }))
}

/// What an offer announces.
struct Offer<'a> {
    pods: u32,
    sandboxes: u32,
    listeners: &'a [NodeListener],
}

impl Offer<'_> {
    /// Reads the rest of the offer: the node's listeners came with it (`descriptors`), then the
    /// pods and the sandboxes follow. The sandboxes go to `sandboxes`, when this agent has them.
    async fn receive(
        &self,
        channel: &Channel,
        descriptors: Vec<OwnedFd>,
        sandboxes: Option<&Sandboxes>,
    ) -> Result<(HashMap<NodeListener, OwnedFd>, HandedPods), WireError> {
        let malformed = |what: String| WireError::Malformed(what);
        if self.listeners.len() != descriptors.len() {
            return Err(malformed(format!(
                "an offer names {} listeners and carries {}",
                self.listeners.len(),
                descriptors.len()
            )));
        }
        if self.pods > MAX_PODS || self.sandboxes > MAX_PODS {
            return Err(malformed(format!(
                "an offer of {} pods and {} sandboxes",
                self.pods, self.sandboxes
            )));
        }
        let listeners = self.listeners.iter().copied().zip(descriptors).collect();
        let handed = HandedPods::default();
        for _ in 0..self.pods {
            let (uid, pod) = receive_pod(channel).await?;
            handed
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(uid, pod);
        }
        for _ in 0..self.sandboxes {
            let (message, _) = channel.receive_within(ANSWER_TIMEOUT).await?;
            let Message::Sandbox { uid, sandbox } = message else {
                return Err(malformed(format!("{message:?} where a sandbox was due")));
            };
            match (sandboxes, sandbox) {
                (Some(sandboxes), Some(sandbox)) => sandboxes.created(WorkloadUid(uid), sandbox),
                (Some(sandboxes), None) => sandboxes.torn_down(&WorkloadUid(uid)),
                (None, _) => {}
            }
        }
        Ok((listeners, handed))
    }
}

/// One pod of an offer: its message, with its namespace and listeners.
async fn receive_pod(channel: &Channel) -> Result<(WorkloadUid, HandedPod), WireError> {
    let malformed = |what: String| WireError::Malformed(what);
    let (message, descriptors) = channel.receive_within(ANSWER_TIMEOUT).await?;
    let Message::Pod { uid, ip } = message else {
        return Err(malformed(format!("{message:?} where a pod was due")));
    };
    let Ok([netns, outbound, inbound_plaintext, hbone, dns_udp, dns_tcp]) =
        <[OwnedFd; POD_DESCRIPTORS.len()]>::try_from(descriptors)
    else {
        return Err(malformed(format!(
            "pod {uid} without its {} descriptors",
            POD_DESCRIPTORS.len()
        )));
    };
    let netns =
        Netns::from_fd(netns).map_err(|e| malformed(format!("pod {uid}: {}", ErrorChain(&e))))?;
    let pod = HandedPod {
        netns,
        listeners: CaptureTarget {
            pod_ip: ip,
            outbound,
            inbound_plaintext,
            hbone,
            dns_udp,
            dns_tcp,
        },
    };
    Ok((WorkloadUid(uid), pod))
}

impl Predecessor {
    /// The node listener `which`, if it was handed over.
    pub(crate) fn listener(&mut self, which: NodeListener) -> Option<OwnedFd> {
        self.listeners.remove(&which)
    }

    pub(crate) fn pods(&self) -> HandedPods {
        self.pods.clone()
    }

    /// Resolves if the predecessor stops waiting to be taken over: it says nothing until then, so
    /// any message, or the connection closing, means it gave up and carries on.
    pub(crate) async fn gave_up(&self) -> WireError {
        match self.channel.receive().await {
            Ok((message, _)) => WireError::Malformed(format!("{message:?} before taken_over")),
            Err(error) => error,
        }
    }

    /// Whether it was stopped rather than taken over from: its listeners are closed, and this
    /// agent binds its own.
    pub(crate) fn was_stopped(&self) -> bool {
        !self.handed_over
    }

    fn sockets(&self) -> usize {
        self.listeners.len() + self.pods.len() * POD_SOCKETS
    }

    /// Tells the predecessor that this agent accepts on the listeners it handed over, and
    /// closes those of pods that were not enrolled. An error leaves both agents accepting: the
    /// predecessor gave up waiting and carries on, so this agent must not.
    pub(crate) async fn confirm(&mut self, metrics: &HandoverMetrics) -> Result<(), WireError> {
        let unused = self.pods.forget();
        if !self.handed_over {
            return Ok(());
        }
        self.channel.send(&Message::TakenOver, &[]).await?;
        // Its first drain report says it heard: it may have given up waiting just before.
        match self.channel.receive_within(ANSWER_TIMEOUT).await? {
            (
                Message::Draining {
                    open_sockets,
                    deadline_seconds,
                },
                _,
            ) => self.draining = (open_sockets, deadline_seconds),
            (other, _) => {
                return Err(WireError::Malformed(format!(
                    "expected draining, got {other:?}"
                )));
            }
        }
        metrics.outcome(Role::Successor, Outcome::TakenOver);
        tracing::info!(
            predecessor.pid = self.pid,
            unused_pods = unused,
            "took over from the running agent; it drains"
        );
        Ok(())
    }

    /// Follows the predecessor's drain until it exits, for `ambit debug agent` and the metrics.
    pub(crate) async fn follow(self, status: Arc<HandoverStatus>, metrics: HandoverMetrics) {
        let Self {
            channel,
            pid,
            handed_over,
            draining: (open_sockets, deadline_seconds),
            ..
        } = self;
        metrics.predecessor_open_sockets(open_sockets);
        status.set_predecessor(PredecessorView {
            pid,
            state: if handed_over { "taken over" } else { "stopped" }.to_owned(),
            open_sockets,
            deadline_seconds,
        });
        loop {
            match channel.receive().await {
                Ok((
                    Message::Draining {
                        open_sockets,
                        deadline_seconds,
                    },
                    _,
                )) => {
                    metrics.predecessor_open_sockets(open_sockets);
                    status.update_predecessor(|view| {
                        view.open_sockets = open_sockets;
                        view.deadline_seconds = deadline_seconds;
                    });
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        metrics.predecessor_open_sockets(0);
        status.update_predecessor(|view| {
            view.state = "exited".to_owned();
            view.open_sockets = 0;
            view.deadline_seconds = 0;
        });
        tracing::info!(predecessor.pid = pid, "the previous agent exited");
    }
}
