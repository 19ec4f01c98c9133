//! Bounds the work anyone can make the agent do before a connection is established: the TLS
//! and HTTP/2 handshakes on 15008, connecting to the app on 15006, reaching the upstream on
//! 15001. Such connections hold a [`Pending`] slot, counted node-wide and per source IP; past
//! either limit a new connection is reset at once, and counted, instead of queueing. Inbound
//! (15006, 15008) and outbound (15001) connections have budgets of their own, so that a flood
//! from outside cannot stop the pods' own connections, nor a pod's slow upstreams its inbound.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;

use crate::sockets;

/// How often, at most, failed handshakes are summed up in a warning.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The limits on connections not established yet, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// On the whole node.
    pub node: usize,
    /// From one source IP.
    pub per_source: usize,
    /// How long the TLS and HTTP/2 handshakes of an HBONE connection may take.
    pub handshake_timeout: Duration,
}

impl Default for PendingLimits {
    fn default() -> Self {
        Self {
            node: 4096,
            per_source: 256,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// The agent's listeners in a pod, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Listener {
    Outbound,
    InboundPlaintext,
    Hbone,
}

impl Listener {
    /// Which budget the listener's connections count against.
    fn budget(self) -> usize {
        match self {
            Self::InboundPlaintext | Self::Hbone => 0,
            Self::Outbound => 1,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::InboundPlaintext => "inbound_plaintext",
            Self::Hbone => "hbone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    /// `node_limit` or `source_limit`.
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    /// `timeout` or `error`.
    reason: &'static str,
}

/// The node's pending connections; shared by every pod's listeners.
pub(crate) struct Admission {
    limits: PendingLimits,
    /// Inbound, outbound.
    budgets: [Mutex<PendingCount>; 2],
    pending_gauge: Gauge,
    refused: Family<RefusedLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    failures: Mutex<Summary>,
}

#[derive(Debug, Default)]
struct PendingCount {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Failed handshakes since the last warning.
#[derive(Debug)]
struct Summary {
    since: Instant,
    failed: u64,
}

/// A connection not established yet; gives its slot back when dropped.
pub(crate) struct Pending {
    admission: Arc<Admission>,
    listener: Listener,
    source: IpAddr,
}

/// How a handshake failed, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    Timeout,
    Error,
}

impl Admission {
    /// Admission under `limits`, its metrics registered in `registry` (ambit's prefix).
    pub(crate) fn new(limits: PendingLimits, registry: &mut Registry) -> Self {
        let admission = Self::unregistered(limits);
        registry.register(
            "pending_connections",
            "Connections accepted by the agent in pods that are not established yet",
            admission.pending_gauge.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections reset at accept because too many were pending on the node or from their source",
            admission.refused.clone(),
        );
        registry.register(
            "handshake_failures",
            "HBONE connections whose TLS or HTTP/2 handshake failed or took longer than the handshake timeout",
            admission.handshake_failures.clone(),
        );
        admission
    }

    /// Admission whose metrics nobody reads: for HBONE outside an agent (tests, tools).
    pub(crate) fn unregistered(limits: PendingLimits) -> Self {
        Self {
            limits,
            budgets: Default::default(),
            pending_gauge: Gauge::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            failures: Mutex::new(Summary {
                since: Instant::now(),
                failed: 0,
            }),
        }
    }

    pub(crate) fn limits(&self) -> PendingLimits {
        self.limits
    }

    /// A pending slot for `tcp`, accepted on `listener` from `peer`; `None` when the node or
    /// the source has no slot left, in which case `tcp` is reset.
    pub(crate) fn admit(
        self: &Arc<Self>,
        listener: Listener,
        tcp: &TcpStream,
        peer: SocketAddr,
    ) -> Option<Pending> {
        let source = peer.ip();
        let refused = {
            let mut pending = lock(&self.budgets[listener.budget()]);
            let from_source = pending.by_source.get(&source).copied().unwrap_or(0);
            if pending.total >= self.limits.node {
                Some("node_limit")
            } else if from_source >= self.limits.per_source {
                Some("source_limit")
            } else {
                pending.total += 1;
                *pending.by_source.entry(source).or_default() += 1;
                None
            }
        };
        if let Some(reason) = refused {
            let labels = RefusedLabels {
                listener: listener.as_str(),
                reason,
            };
            self.refused.get_or_create(&labels).inc();
            sockets::reset_on_close(tcp);
            tracing::debug!(src.addr = %peer, listener = listener.as_str(), reason, "connection refused: too many pending");
            return None;
        }
        self.pending_gauge.inc();
        Some(Pending {
            admission: self.clone(),
            listener,
            source,
        })
    }

    /// Counts a failed handshake: logged at debug, summed up in a warning at most every
    /// [`SUMMARY_INTERVAL`], so that a flood of bad clients cannot flood the log.
    pub(crate) fn handshake_failed(
        &self,
        failure: HandshakeFailure,
        peer: SocketAddr,
        error: &dyn fmt::Display,
    ) {
        let reason = match failure {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Error => "error",
        };
        self.handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .inc();
        tracing::debug!(src.addr = %peer, %error, "HBONE handshake failed");
        let mut summary = lock(&self.failures);
        summary.failed += 1;
        if summary.since.elapsed() >= SUMMARY_INTERVAL {
            let seconds = summary.since.elapsed().as_secs();
            tracing::warn!(failed = summary.failed, seconds, latest.src.addr = %peer, latest.error = %error, "HBONE handshakes failed");
            *summary = Summary {
                since: Instant::now(),
                failed: 0,
            };
        }
    }

    fn release(&self, listener: Listener, source: IpAddr) {
        let mut pending = lock(&self.budgets[listener.budget()]);
        // Every `Pending` was counted in its budget once, and is released once.
        pending.total -= 1;
        if let Some(count) = pending.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                pending.by_source.remove(&source);
            }
        }
        self.pending_gauge.dec();
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("inbound", &lock(&self.budgets[0]).total)
            .field("outbound", &lock(&self.budgets[1]).total)
            .finish_non_exhaustive()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.admission.release(self.listener, self.source);
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pending").field(&self.source).finish()
    }
}

/// Every update is a counter step, so a poisoned lock still holds consistent counts.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn connection() -> (TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, _client) = tokio::join!(listener.accept(), client);
        accepted.unwrap()
    }

    #[tokio::test]
    async fn limits_hold_per_source_and_per_node_in_each_direction_and_slots_come_back() {
        let limits = PendingLimits {
            node: 3,
            per_source: 2,
            ..PendingLimits::default()
        };
        let admission = Arc::new(Admission::new(limits, &mut Registry::default()));
        let (tcp, peer) = connection().await;
        let other: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let third: SocketAddr = "192.0.2.2:1000".parse().unwrap();

        let first = admission.admit(Listener::Hbone, &tcp, peer).unwrap();
        let _second = admission
            .admit(Listener::InboundPlaintext, &tcp, peer)
            .unwrap();
        let source_full = admission.admit(Listener::Hbone, &tcp, peer);
        assert!(source_full.is_none(), "source full");
        let _from_other = admission.admit(Listener::Hbone, &tcp, other).unwrap();
        let node_full = admission.admit(Listener::Hbone, &tcp, third);
        assert!(node_full.is_none(), "node full");
        // Outbound connections have a budget of their own.
        let _outbound = admission.admit(Listener::Outbound, &tcp, third).unwrap();
        let _outbound_too = admission.admit(Listener::Outbound, &tcp, peer).unwrap();

        drop(first);
        let _third = admission.admit(Listener::Hbone, &tcp, third).unwrap();
        let refused = RefusedLabels {
            listener: "hbone",
            reason: "source_limit",
        };
        assert_eq!(admission.refused.get_or_create(&refused).get(), 1);
        assert_eq!(admission.pending_gauge.get(), 5);
    }

    #[tokio::test]
    async fn no_count_is_kept_for_a_source_without_pending_connections() {
        let admission = Arc::new(Admission::unregistered(PendingLimits::default()));
        let (tcp, peer) = connection().await;
        drop(admission.admit(Listener::InboundPlaintext, &tcp, peer));
        drop(admission.admit(Listener::Outbound, &tcp, peer));
        for budget in &admission.budgets {
            let pending = lock(budget);
            assert_eq!((pending.total, pending.by_source.len()), (0, 0));
        }
    }
}
