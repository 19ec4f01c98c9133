//! Where the agent learns about the cluster. Each source gathers Kubernetes objects, turns them
//! into one [`ClusterState`] through the same translation (`translate`), and publishes a new
//! state whenever they change.

use std::sync::Arc;

use tokio::sync::watch;

use crate::drain::DrainWatcher;
use crate::enrolment::CaptureStatus;
use crate::state::ClusterState;

pub(crate) mod file;
mod kubernetes;
mod translate;

pub use file::{FileSource, SourceError};
pub(crate) use kubernetes::client as kubernetes_client;
pub use kubernetes::{KubernetesError, KubernetesSource, STATE_UPDATED};
pub use translate::ObjectError;

/// A source, ready to run.
#[derive(Debug)]
pub(crate) enum Source {
    /// With the state it read at start.
    File(FileSource, Box<ClusterState>),
    Kubernetes(KubernetesSource),
}

impl Source {
    /// Publishes into `states` the source's first complete view of the cluster, then every
    /// change, until a drain starts. The node's `capture` status goes back to the cluster where
    /// the source can hold it.
    pub(crate) async fn run(
        self,
        states: watch::Sender<Arc<ClusterState>>,
        capture: watch::Receiver<CaptureStatus>,
        drain: DrainWatcher,
    ) {
        match self {
            Self::File(source, initial) => {
                states.send_replace(Arc::new(*initial));
                source.watch(states, drain).await;
            }
            Self::Kubernetes(source) => source.run(states, capture, drain).await,
        }
    }
}
