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
    request: Arc<InboundRequest>,
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
        let request = Arc::new(request);
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
        // Unknown at first: the states before the first change are not all known here.
        let mut previous: Option<Arc<ClusterState>> = None;
        while states.changed().await.is_ok() {
            let state = states.borrow_and_update().clone();
            self.revoke_denied(previous.as_deref(), &state);
            previous = Some(state);
        }
    }

    /// Revokes every watched connection that `state` denies. Only connections whose decision
    /// could differ from the one taken under `previous` are decided again: all of them when a
    /// policy changed (or `previous` is unknown), else those whose destination changed. Decided
    /// outside the lock, so that connections opening and closing meanwhile do not wait for the
    /// whole pass.
    fn revoke_denied(&self, previous: Option<&ClusterState>, state: &ClusterState) {
        let policies_changed = previous.is_none_or(|previous| {
            previous.authorization() != state.authorization()
                || previous.peer_authentication() != state.peer_authentication()
        });
        let watched: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, w)| {
                policies_changed || previous.is_some_and(|p| destination_changed(p, state, w))
            })
            .map(|(id, w)| (*id, w.policy.clone(), w.request.clone()))
            .collect();
        let denied: Vec<(u64, Verdict)> = watched
            .into_iter()
            .filter_map(
                |(id, policy, request)| match policy.decide(state, &request, false) {
                    Verdict::Allow => None,
                    denied @ Verdict::Deny { .. } => Some((id, denied)),
                },
            )
            .collect();
        let mut watched = self.lock();
        for (id, verdict) in denied {
            // Gone if the connection ended meanwhile.
            if let Some(connection) = watched.remove(&id) {
                connection.policy.revoked();
                let _ = connection.revoke.send(verdict);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Watched>> {
        // Updates are single inserts and removals: a poisoned map is still consistent.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether what a decision on `watched` reads of the destination changed between the two states:
/// its workload (namespace, labels), the Services its address backs, or the waypoints in front
/// of it.
fn destination_changed(previous: &ClusterState, state: &ClusterState, watched: &Watched) -> bool {
    let workload = &watched.policy.workload;
    let address = watched.request.destination.ip();
    workload.current(previous) != workload.current(state)
        || previous.services_of(address) != state.services_of(address)
        || previous.waypoints_of(address) != state.waypoints_of(address)
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.revocations.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
