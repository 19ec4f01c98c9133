//! Closing open inbound connections that a change of the cluster no longer allows.
//!
//! Each allowed connection registers here; one task per agent re-decides every registered
//! connection when the state changes, and tells only those it now denies. A connection waits
//! on a channel of its own and is woken once, when it is revoked, not at every change of the
//! cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};

use crate::authorize::{InboundRequest, RevokedFuture, Verdict, WorkloadPolicy};
use crate::state::ClusterState;

/// The open inbound connections of the agent that a policy change may revoke.
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    watched: Mutex<HashMap<u64, Watched>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Watched {
    policy: Arc<WorkloadPolicy>,
    request: InboundRequest,
    revoke: oneshot::Sender<Verdict>,
}

/// Forgets a connection when it ends, revoked or not.
struct Registration {
    revocations: Arc<Revocations>,
    id: u64,
}

impl Revocations {
    /// Resolves, with the denial, once `policy` no longer allows `request`. `states` is where
    /// the connection was authorized: a change published since then, which the re-deciding task
    /// may have handled before this registration, is checked here.
    pub(crate) fn watch(
        self: &Arc<Self>,
        policy: Arc<WorkloadPolicy>,
        request: InboundRequest,
        states: &watch::Receiver<Arc<ClusterState>>,
    ) -> RevokedFuture {
        let (revoke, revoked) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let watched = Watched {
            policy: policy.clone(),
            request: request.clone(),
            revoke,
        };
        self.lock().insert(id, watched);
        let registration = Registration {
            revocations: self.clone(),
            id,
        };
        // Registered first, decided second: any later change reaches the task.
        let current = states.borrow().clone();
        if let denied @ Verdict::Deny { .. } = policy.decide(&current, &request, false) {
            policy.revoked();
            drop(registration);
            return Box::pin(std::future::ready(denied));
        }
        Box::pin(async move {
            let _registration = registration;
            match revoked.await {
                Ok(denied) => denied,
                // The agent is going away: nothing revokes the connection any more.
                Err(_) => std::future::pending().await,
            }
        })
    }

    /// Re-decides the watched connections at each change of the state, until the state's
    /// sender is gone (the source stopped).
    pub(crate) async fn run(self: Arc<Self>, mut states: watch::Receiver<Arc<ClusterState>>) {
        while states.changed().await.is_ok() {
            let state = states.borrow_and_update().clone();
            self.revoke_denied(&state);
        }
    }

    /// Revokes every watched connection that `state` denies.
    fn revoke_denied(&self, state: &ClusterState) {
        let mut watched = self.lock();
        let denied: Vec<(u64, Verdict)> = watched
            .iter()
            .filter_map(|(id, w)| match w.policy.decide(state, &w.request, false) {
                Verdict::Allow => None,
                denied @ Verdict::Deny { .. } => Some((*id, denied)),
            })
            .collect();
        for (id, verdict) in denied {
            if let Some(connection) = watched.remove(&id) {
                connection.policy.revoked();
                // The connection may be ending on its own right now.
                let _ = connection.revoke.send(verdict);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Watched>> {
        // Updates are single inserts and removals: a poisoned map is still consistent.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.revocations.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
