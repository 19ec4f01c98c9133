//! The predecessor's side: every agent listens on the hand-over socket, and answers the agent
//! that comes to replace it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_redirect::CaptureBackend;
use tokio::sync::{mpsc, oneshot, watch};

use super::wire::{Channel, Listener, Message, NodeListener, POD_SOCKETS, PROTOCOL, WireError};
use super::{HandoverMetrics, OfferRequest, OfferedPod, Outcome, Replaced, Role};
use crate::error_chain::ErrorChain;
use crate::readiness::Readiness;
use crate::sandboxes::Sandboxes;
use crate::telemetry::Telemetry;

/// How long a successor may take to say hello, or to ask this agent to stop once refused.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a successor may take, once it has the listeners, to read the cluster and enrol the
/// node's pods on them. Past it, this agent carries on as before and closes the connection.
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The pause after a failed hand-over, before the next successor is answered.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How often a replaced agent tells its successor what it still carries.
const DRAIN_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// What answering a successor needs.
#[derive(Debug)]
pub(crate) struct HandoverServer {
    /// `--redirect`'s backend: a successor with another cannot take over capture in place.
    pub(crate) capture: Arc<dyn CaptureBackend>,
    /// The node's listeners, duplicated, to hand over.
    pub(crate) listeners: Vec<(NodeListener, OwnedFd)>,
    /// The sandboxes the CNI plugin reported, which a successor needs to enrol pods whose
    /// containers have not started; none without the plugin.
    pub(crate) sandboxes: Option<Sandboxes>,
    /// Where the enrolment loop takes offer requests.
    pub(crate) enrolment: mpsc::Sender<OfferRequest>,
    pub(crate) readiness: Readiness,
    /// Counts the sockets this agent still carries once replaced.
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) metrics: HandoverMetrics,
    /// How long this agent drains once replaced.
    pub(crate) drain_timeout: Duration,
}

impl HandoverServer {
    /// Answers successors, one at a time, until one replaces this agent: then says so through
    /// `replaced`, stops listening, and reports its drain to that successor until it exits.
    pub(crate) async fn serve(
        mut self,
        listener: Listener,
        replaced: watch::Sender<Option<Replaced>>,
    ) {
        loop {
            let channel = match listener.accept().await {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(error = %ErrorChain(&error), "hand-over socket: refused a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.answer(&channel).await {
                Ok(Some(how)) => {
                    // Stopped, this agent must not keep the node's ports open.
                    self.listeners.clear();
                    drop(listener);
                    // This agent's link watchers must not undo the successor's capture. (The
                    // enrolment loop lets go too, once it hears; it may be mid-pass when stopped.)
                    self.capture.relinquish();
                    let deadline = Instant::now() + self.drain_timeout;
                    // Answered before the agent drains: with nothing to drain, it exits at once.
                    // Stopped, the node's listeners close as the drain starts: the successor
                    // waits for their ports.
                    let answer = match how {
                        Replaced::TakenOver => self.drain_report(deadline),
                        Replaced::Stopped => Message::Released,
                    };
                    let _ = channel.send(&answer, &[]).await;
                    replaced.send_replace(Some(how));
                    self.report_drain(&channel, deadline).await;
                    return;
                }
                Ok(None) => {}
                Err(error) => {
                    self.metrics.outcome(Role::Predecessor, Outcome::Failed);
                    tracing::warn!(error = %ErrorChain(&error), "a hand-over failed; this agent carries on");
                    // Each attempt pauses enrolment: one a second at most.
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// One successor's conversation: whether it replaced this agent, and how.
    async fn answer(&self, channel: &Channel) -> Result<Option<Replaced>, WireError> {
        let hello = channel.receive_within(HELLO_TIMEOUT).await;
        let refusal = match &hello {
            Ok((
                Message::Hello {
                    protocol,
                    capture,
                    pid,
                },
                _,
            )) => {
                tracing::info!(
                    successor.pid = pid,
                    protocol,
                    capture,
                    "an agent asks to take over"
                );
                if self.readiness.is_draining() {
                    Some("this agent is stopping: its pods' listeners are closed".to_owned())
                } else if *protocol != PROTOCOL {
                    Some(format!(
                        "this agent speaks hand-over protocol {PROTOCOL}, the new one {protocol}"
                    ))
                } else if capture != self.capture.name() {
                    Some(format!(
                        "this agent captures with {}, the new one with {capture}: one backend cannot take over the other's capture in place",
                        self.capture.name()
                    ))
                } else {
                    None
                }
            }
            Ok((other, _)) => Some(format!("expected a hello, got {other:?}")),
            // A message of a version this one cannot read: refused, as the protocol's first
            // message always is when it is not understood.
            Err(WireError::Malformed(error)) => Some(format!("unreadable hello: {error}")),
            // Connected and gone without a word: an agent checking whether this one runs.
            Err(WireError::Closed) => return Ok(None),
            Err(_) => return hello.map(|_| None),
        };
        match refusal {
            Some(reason) => self.refuse(channel, reason).await,
            None => self.offer(channel).await,
        }
    }

    /// Says why this agent will not hand over, then stops if asked to.
    async fn refuse(
        &self,
        channel: &Channel,
        reason: String,
    ) -> Result<Option<Replaced>, WireError> {
        tracing::warn!(reason, "refusing to hand over");
        self.metrics.outcome(Role::Predecessor, Outcome::Refused);
        let refused = Message::Refused {
            reason,
            pid: std::process::id(),
        };
        channel.send(&refused, &[]).await?;
        match channel.receive_within(HELLO_TIMEOUT).await {
            Ok((Message::Stop, _)) => {
                tracing::info!("asked to stop by the agent replacing this one");
                Ok(Some(Replaced::Stopped))
            }
            // Refused, and left running: the refusal was the outcome.
            Err(WireError::Closed) => Ok(None),
            Ok((other, _)) => Err(WireError::Malformed(format!(
                "expected stop, got {other:?}"
            ))),
            Err(error) => Err(error),
        }
    }

    /// Hands the listeners over and waits for the successor to take over.
    async fn offer(&self, channel: &Channel) -> Result<Option<Replaced>, WireError> {
        let (pods_sender, pods) = oneshot::channel();
        let (outcome, outcome_receiver) = oneshot::channel();
        let request = OfferRequest {
            pods: pods_sender,
            outcome: outcome_receiver,
        };
        let stopping = || WireError::Malformed("this agent is stopping".to_owned());
        self.enrolment.send(request).await.map_err(|_| stopping())?;
        let pods = pods.await.map_err(|_| stopping())?;
        // From here the successor's readiness probe may reach this agent: it must not answer
        // "ready" for it.
        self.readiness.hand_over(true);
        let handed = self.send_offer(channel, &pods).await;
        drop(pods);
        let answer = match handed {
            Ok(()) => channel.receive_within(TAKE_OVER_TIMEOUT).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok((Message::TakenOver, _)) => {}
            Ok((other, _)) => {
                self.readiness.hand_over(false);
                return Err(WireError::Malformed(format!(
                    "expected taken_over, got {other:?}"
                )));
            }
            Err(error) => {
                self.readiness.hand_over(false);
                return Err(error);
            }
        };
        let _ = outcome.send(Replaced::TakenOver);
        self.metrics.outcome(Role::Predecessor, Outcome::TakenOver);
        tracing::info!("taken over by a new agent; draining");
        Ok(Some(Replaced::TakenOver))
    }

    async fn send_offer(&self, channel: &Channel, pods: &[OfferedPod]) -> Result<(), WireError> {
        let (live, torn_down) = match &self.sandboxes {
            Some(sandboxes) => (sandboxes.live(), sandboxes.torn_down_pods()),
            None => (Vec::new(), Vec::new()),
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let offer = Message::Offer {
            pid: std::process::id(),
            pods: count(pods.len()),
            sandboxes: count(live.len() + torn_down.len()),
            listeners: self.listeners.iter().map(|(name, _)| *name).collect(),
        };
        let listeners: Vec<BorrowedFd<'_>> =
            self.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        channel.send(&offer, &listeners).await?;
        for pod in pods {
            let message = Message::Pod {
                uid: pod.uid.0.clone(),
                ip: pod.listeners.pod_ip,
            };
            let target = &pod.listeners;
            let descriptors = [
                pod.netns.as_fd(),
                target.outbound.as_fd(),
                target.inbound_plaintext.as_fd(),
                target.hbone.as_fd(),
                target.dns_udp.as_fd(),
                target.dns_tcp.as_fd(),
            ];
            channel.send(&message, &descriptors).await?;
        }
        let live = live.into_iter().map(|(uid, sandbox)| (uid, Some(sandbox)));
        let torn_down = torn_down.into_iter().map(|uid| (uid, None));
        for (uid, sandbox) in live.chain(torn_down) {
            let message = Message::Sandbox {
                uid: uid.0,
                sandbox,
            };
            channel.send(&message, &[]).await?;
        }
        let sockets = self.listeners.len() + pods.len() * POD_SOCKETS;
        self.metrics
            .handed_over(Role::Predecessor, pods.len(), sockets);
        tracing::info!(
            pods = pods.len(),
            listeners = self.listeners.len(),
            "handed the listeners over"
        );
        Ok(())
    }

    /// Tells the successor, every second, the sockets this agent still carries, until it exits
    /// or the successor goes away.
    async fn report_drain(&self, channel: &Channel, deadline: Instant) {
        loop {
            tokio::time::sleep(DRAIN_REPORT_INTERVAL).await;
            if channel
                .send(&self.drain_report(deadline), &[])
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The sockets this agent carries, and the time left to `deadline`.
    fn drain_report(&self, deadline: Instant) -> Message {
        Message::Draining {
            open_sockets: self.telemetry.metrics.open_sockets(),
            deadline_seconds: deadline.saturating_duration_since(Instant::now()).as_secs(),
        }
    }
}
