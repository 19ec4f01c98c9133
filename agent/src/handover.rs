//! Upgrades without a gap: a new agent on the node (the *successor*) takes the running one's
//! (the *predecessor's*) listening sockets over a Unix socket, accepts every new connection from
//! then on, and the predecessor drains what it carries and exits.
//!
//! 1. The successor connects to `--handover-socket` and says hello: its protocol version and
//!    capture backend.
//! 2. The predecessor pauses enrolment, turns its readiness off (the successor's readiness probe
//!    may reach it: both listen on the node's ports), and sends the node's listeners, then each
//!    captured pod's namespace and listeners. It keeps accepting on all of them meanwhile.
//! 3. The successor reads the cluster, enrols every pod on the sockets it was given (capture is
//!    replaced in place, never removed), then says it has taken over.
//! 4. The predecessor stops accepting, stops maintaining capture, and drains as on SIGTERM,
//!    reporting the sockets it still carries until it exits.
//!
//! A predecessor that cannot hand over (another protocol version, another capture backend)
//! refuses, and the successor asks it to stop instead: a clean replacement, in which the node's
//! pods fail closed until the successor captures them. A successor that goes away before it took
//! over leaves the predecessor as it was.

mod give;
mod take;
pub(crate) mod wire;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ambit_redirect::{CaptureTarget, PodNetns};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

pub(crate) use give::HandoverServer;
pub(crate) use take::{HandedPods, Predecessor, take_over};

use crate::admin::views::{AgentView, PredecessorView};
use crate::state::WorkloadUid;

/// A captured pod as the enrolment loop offers it.
#[derive(Debug)]
pub(crate) struct OfferedPod {
    pub(crate) uid: WorkloadUid,
    pub(crate) netns: PodNetns,
    pub(crate) listeners: Arc<CaptureTarget>,
}

/// What a successor's hello asks of the enrolment loop: its pods, and to wait for the outcome.
#[derive(Debug)]
pub(crate) struct OfferRequest {
    pub(crate) pods: oneshot::Sender<Vec<OfferedPod>>,
    /// Dropped without a word: the hand-over failed, and the loop resumes.
    pub(crate) outcome: oneshot::Receiver<Replaced>,
}

/// How the agent was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replaced {
    /// The successor accepts on the listeners this agent handed over.
    TakenOver,
    /// The successor could not take over, and asked this agent to stop.
    Stopped,
}

/// What the agent knows of its predecessor, for the admin API.
#[derive(Debug)]
pub(crate) struct HandoverStatus {
    started: Instant,
    capture: &'static str,
    predecessor: Mutex<Option<PredecessorView>>,
}

impl HandoverStatus {
    pub(crate) fn new(capture: &'static str) -> Self {
        Self {
            started: Instant::now(),
            capture,
            predecessor: Mutex::default(),
        }
    }

    fn set_predecessor(&self, view: PredecessorView) {
        *self
            .predecessor
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(view);
    }

    fn update_predecessor(&self, update: impl FnOnce(&mut PredecessorView)) {
        if let Some(view) = self
            .predecessor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            update(view);
        }
    }

    pub(crate) fn view(&self) -> AgentView {
        AgentView {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            capture: self.capture.to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            predecessor: self
                .predecessor
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// The hand-over's metrics, under ambit's prefix.
#[derive(Debug, Clone, Default)]
pub(crate) struct HandoverMetrics {
    handovers: Family<OutcomeLabels, Counter>,
    pods: Family<RoleLabel, Counter>,
    sockets: Family<RoleLabel, Counter>,
    predecessor_open_sockets: Gauge,
}

/// Which side of a hand-over this agent was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    Predecessor,
    Successor,
}

/// How a hand-over ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// The successor accepts on the predecessor's listeners.
    TakenOver,
    /// The predecessor could not hand over; the successor stopped it.
    Refused,
    /// The conversation broke off; the predecessor carries on.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    role: &'static str,
    outcome: &'static str,
}

impl Role {
    fn label(self) -> RoleLabel {
        RoleLabel {
            role: match self {
                Self::Predecessor => "predecessor",
                Self::Successor => "successor",
            },
        }
    }
}

impl HandoverMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "handovers",
            "Hand-overs this agent took part in, by role (predecessor, successor) and outcome (taken_over; refused: the predecessor was stopped instead; failed: it carried on)",
            metrics.handovers.clone(),
        );
        registry.register(
            "handover_pods",
            "Pods whose listeners were handed over, by role",
            metrics.pods.clone(),
        );
        registry.register(
            "handover_sockets",
            "Listening sockets handed over, the node's and the pods', by role",
            metrics.sockets.clone(),
        );
        registry.register(
            "predecessor_open_sockets",
            "Sockets the agent this one replaced still carries while it drains; 0 once it exited",
            metrics.predecessor_open_sockets.clone(),
        );
        metrics
    }

    fn outcome(&self, role: Role, outcome: Outcome) {
        let labels = OutcomeLabels {
            role: role.label().role,
            outcome: match outcome {
                Outcome::TakenOver => "taken_over",
                Outcome::Refused => "refused",
                Outcome::Failed => "failed",
            },
        };
        self.handovers.get_or_create(&labels).inc();
    }

    fn handed_over(&self, role: Role, pods: usize, sockets: usize) {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.pods.get_or_create(&role.label()).inc_by(count(pods));
        self.sockets
            .get_or_create(&role.label())
            .inc_by(count(sockets));
    }

    fn predecessor_open_sockets(&self, open: u64) {
        self.predecessor_open_sockets
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }
}
