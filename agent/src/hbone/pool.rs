//! Pooled HBONE connections: many CONNECT streams share one mTLS connection.
//!
//! Connections are keyed by everything that makes two of them interchangeable: the source
//! identity and IP, the destination, and the identities the server may prove. A key has at most
//! one dial in flight, and the callers that wait for it share its outcome. A connection carries
//! at most `max_streams_per_connection` streams. It leaves the pool once it has carried none for
//! `idle_timeout`, once it is past its expiry (maximum age, or either certificate's end), or
//! once it can open no more streams (GOAWAY, peer gone); streams already open on it finish.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use ambit_identity::Identity;
use bytes::Bytes;
use h2::PingPong;
use h2::client::{Connection, SendRequest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::client::ConnectError;
use super::{ClientSettings, keepalive};

/// What makes two HBONE connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) source: Identity,
    pub(crate) source_ip: IpAddr,
    pub(crate) destination: SocketAddr,
    /// Sorted, so that the order the caller listed them in does not matter.
    pub(crate) expected: Vec<Identity>,
}

/// A freshly dialed connection, before it joins the pool.
pub(crate) struct Dialed {
    pub(crate) sender: SendRequest<Bytes>,
    pub(crate) connection: Connection<TlsStream<TcpStream>, Bytes>,
    pub(crate) pings: PingPong,
    /// When the first of the two certificates that authenticated the connection expires.
    pub(crate) certificates_expire: SystemTime,
}

#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    settings: ClientSettings,
    keys: Mutex<HashMap<PoolKey, KeyConnections>>,
    next_id: AtomicU64,
    /// Streams open on every connection dialed here, including those that left the pool and
    /// only finish their streams.
    streams: Arc<AtomicUsize>,
}

/// A key's entry; removed as soon as it has neither connections nor a dial in flight.
#[derive(Default)]
struct KeyConnections {
    dialing: Option<Dialing>,
    connections: Vec<Arc<PooledConnection>>,
}

/// The dial in flight for a key: callers that find no room wait for its outcome instead of
/// dialing too.
struct Dialing {
    id: u64,
    outcome: watch::Receiver<Option<DialOutcome>>,
}

/// `Ok` once the dialed connection is in the pool; the error is shared by everyone who waited.
type DialOutcome = Result<(), Arc<ConnectError>>;

struct PooledConnection {
    id: u64,
    sender: SendRequest<Bytes>,
    /// Streams open on this connection; watched to notice when it goes idle.
    streams: watch::Sender<usize>,
    max_streams: usize,
    /// The pool's count of streams, over all its connections.
    pool_streams: Arc<AtomicUsize>,
    /// No stream is claimed from this instant on.
    expires: Instant,
    /// Set once the connection must take no new stream; its driver then takes it out of the
    /// pool.
    retired: watch::Sender<bool>,
}

/// The right to open one stream on a pooled connection; gives the slot back when dropped.
pub(crate) struct StreamClaim(Arc<PooledConnection>);

/// What a caller does next for a key.
enum Next {
    Claimed(StreamClaim),
    Wait(watch::Receiver<Option<DialOutcome>>),
    Dial(DialTicket),
}

/// Held by the one caller that dials for a key. Dropped before it settles (the caller gave
/// up), it clears the key's dial so that the waiters and later callers start another.
struct DialTicket {
    pool: Pool,
    key: PoolKey,
    id: u64,
    outcome: watch::Sender<Option<DialOutcome>>,
}

impl Pool {
    pub(crate) fn new(settings: ClientSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                keys: Mutex::default(),
                next_id: AtomicU64::new(0),
                streams: Arc::default(),
            }),
        }
    }

    /// A stream slot on a pooled connection for `key`. When none has room, waits for the dial
    /// in flight, or dials one with `dial`.
    pub(crate) async fn checkout<F, Fut>(
        &self,
        key: &PoolKey,
        dial: F,
    ) -> Result<StreamClaim, ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialed, ConnectError>>,
    {
        loop {
            let mut outcome = match self.claim_or_join(key) {
                Next::Claimed(claim) => return Ok(claim),
                Next::Dial(ticket) => return self.dial(ticket, dial).await,
                Next::Wait(outcome) => outcome,
            };
            // A closed channel means the dialing caller gave up: look again.
            if let Ok(outcome) = outcome.wait_for(Option::is_some).await
                && let Some(Err(error)) = &*outcome
            {
                return Err(ConnectError::SharedDial {
                    addr: key.destination,
                    source: error.clone(),
                });
            }
            // The dial succeeded: its connection has room unless others took it all first.
        }
    }

    /// Connections currently pooled, over all keys.
    pub(crate) fn connections(&self) -> usize {
        self.lock().values().map(|k| k.connections.len()).sum()
    }

    /// Keys with pooled connections or a dial in flight.
    pub(crate) fn keys(&self) -> usize {
        self.lock().len()
    }

    /// Streams open, also on connections that left the pool and finish their streams.
    pub(crate) fn streams(&self) -> usize {
        self.shared.streams.load(Ordering::Relaxed)
    }

    /// Under one lock: claims a slot on a usable connection, or joins the dial in flight, or
    /// becomes the caller that dials.
    fn claim_or_join(&self, key: &PoolKey) -> Next {
        let mut keys = self.lock();
        let entry = keys.entry(key.clone()).or_default();
        entry.connections.retain(|c| {
            let usable = c.usable();
            if !usable {
                c.retire();
            }
            usable
        });
        if let Some(claim) = entry.connections.iter().find_map(PooledConnection::claim) {
            return Next::Claimed(claim);
        }
        if let Some(dialing) = &entry.dialing {
            return Next::Wait(dialing.outcome.clone());
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (outcome, receiver) = watch::channel(None);
        entry.dialing = Some(Dialing {
            id,
            outcome: receiver,
        });
        Next::Dial(DialTicket {
            pool: self.clone(),
            key: key.clone(),
            id,
            outcome,
        })
    }

    /// Dials for `ticket`'s key; puts the connection in the pool, or shares the error with the
    /// callers that waited.
    async fn dial<F, Fut>(&self, ticket: DialTicket, dial: F) -> Result<StreamClaim, ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialed, ConnectError>>,
    {
        let dialed = match dial().await {
            Ok(dialed) => dialed,
            Err(error) => return Err(ticket.fail(error)),
        };
        let settings = &self.shared.settings;
        let expires =
            after(settings.max_connection_age).min(instant_of(dialed.certificates_expire));
        let connection = Arc::new(PooledConnection {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            sender: dialed.sender,
            streams: watch::Sender::new(0),
            max_streams: settings.max_streams_per_connection.max(1),
            pool_streams: self.shared.streams.clone(),
            expires,
            retired: watch::Sender::new(false),
        });
        // The caller that dialed gets its stream even if the connection is already expired:
        // the TLS handshake just checked both certificates.
        let claim = connection
            .claim()
            .unwrap_or_else(|| unreachable!("a new connection has free stream slots"));
        let key = ticket.key.clone();
        ticket.succeed(connection.clone());
        tokio::spawn(
            self.clone()
                .drive(key, connection, dialed.connection, dialed.pings),
        );
        Ok(claim)
    }

    /// Runs one connection until it fails or stops answering PINGs. Once it leaves the pool,
    /// it runs on only for the streams still open on it; h2 says GOAWAY and closes after the
    /// last.
    async fn drive(
        self,
        key: PoolKey,
        pooled: Arc<PooledConnection>,
        connection: Connection<TlsStream<TcpStream>, Bytes>,
        pings: PingPong,
    ) {
        let id = pooled.id;
        let mut connection = std::pin::pin!(connection);
        let mut keepalive = std::pin::pin!(keepalive::run(pings, self.shared.settings.keepalive));
        let left = tokio::select! {
            result = &mut connection => Self::ended(&key, result),
            error = &mut keepalive => Self::unresponsive(&key, &error),
            () = self.leave(&key, pooled) => true,
        };
        if left {
            tokio::select! {
                result = &mut connection => Self::ended(&key, result),
                error = &mut keepalive => Self::unresponsive(&key, &error),
            };
        }
        self.remove(&key, |c| c.id == id);
    }

    /// Logs how the connection ended; `false`: it is not still running.
    fn ended(key: &PoolKey, result: Result<(), h2::Error>) -> bool {
        if let Err(error) = result {
            tracing::debug!(dst.addr = %key.destination, %error, "pooled HBONE connection failed");
        }
        false
    }

    fn unresponsive(key: &PoolKey, error: &keepalive::KeepaliveError) -> bool {
        tracing::warn!(dst.addr = %key.destination, %error, "closing unresponsive HBONE connection");
        false
    }

    /// Returns once `pooled` is out of the pool: idle for the idle timeout, expired, or
    /// retired. The last handle this task held on the connection goes with it.
    async fn leave(&self, key: &PoolKey, pooled: Arc<PooledConnection>) {
        let mut retired = pooled.retired.subscribe();
        tokio::select! {
            () = self.idle(key, &pooled) => {}
            () = tokio::time::sleep_until(pooled.expires) => {}
            // The sender lives in `pooled`, so this wait cannot fail.
            _ = retired.wait_for(|&retired| retired) => {}
        }
        pooled.retire();
        self.remove(key, |c| Arc::ptr_eq(c, &pooled));
    }

    /// Returns once `pooled` has carried no stream for the idle timeout and left the pool, or
    /// left it for another reason.
    async fn idle(&self, key: &PoolKey, pooled: &Arc<PooledConnection>) {
        let mut streams = pooled.streams.subscribe();
        loop {
            // The sender lives in `pooled`, so these waits cannot fail.
            let _ = streams.wait_for(|&n| n == 0).await;
            let busy = streams.wait_for(|&n| n > 0);
            if tokio::time::timeout(self.shared.settings.idle_timeout, busy)
                .await
                .is_ok()
            {
                continue;
            }
            if self.leave_if_idle(key, pooled) {
                return;
            }
        }
    }

    /// Takes `pooled` out of the pool if it carries no stream; whether it is out now. Claims
    /// are made under the same lock, so none can slip in between check and removal.
    fn leave_if_idle(&self, key: &PoolKey, pooled: &Arc<PooledConnection>) -> bool {
        let mut keys = self.lock();
        let Some(entry) = keys.get_mut(key) else {
            return true;
        };
        let Some(index) = entry
            .connections
            .iter()
            .position(|c| Arc::ptr_eq(c, pooled))
        else {
            return true;
        };
        if *pooled.streams.borrow() > 0 {
            return false;
        }
        entry.connections.swap_remove(index);
        if entry.connections.is_empty() && entry.dialing.is_none() {
            keys.remove(key);
        }
        true
    }

    /// Removes the connection of `key` that `matches`; drops the key once it has nothing left.
    fn remove(&self, key: &PoolKey, matches: impl Fn(&Arc<PooledConnection>) -> bool) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(key) {
            entry.connections.retain(|c| !matches(c));
            if entry.connections.is_empty() && entry.dialing.is_none() {
                keys.remove(key);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyConnections>> {
        // Every update is a single push, retain or remove, so a poisoned map is still consistent.
        self.shared
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl DialTicket {
    /// Puts the dialed connection in the pool, then wakes the waiters to claim on it.
    fn succeed(self, connection: Arc<PooledConnection>) {
        {
            let mut keys = self.pool.lock();
            let entry = keys.entry(self.key.clone()).or_default();
            entry.connections.push(connection);
            if entry.dialing.as_ref().is_some_and(|d| d.id == self.id) {
                entry.dialing = None;
            }
        }
        self.outcome.send_replace(Some(Ok(())));
    }

    /// Clears the key's dial, so that later callers dial afresh, and fails every waiter with
    /// `error`. Once shared, the caller that dialed gets it wrapped like the others.
    fn fail(self, error: ConnectError) -> ConnectError {
        self.clear();
        // Waiters hold the only receivers left, and no new one can join a cleared dial.
        if self.outcome.receiver_count() == 0 {
            return error;
        }
        let error = Arc::new(error);
        self.outcome.send_replace(Some(Err(error.clone())));
        ConnectError::SharedDial {
            addr: self.key.destination,
            source: error,
        }
    }

    fn clear(&self) {
        let mut keys = self.pool.lock();
        if let Some(entry) = keys.get_mut(&self.key)
            && entry.dialing.as_ref().is_some_and(|d| d.id == self.id)
        {
            entry.dialing = None;
            if entry.connections.is_empty() {
                keys.remove(&self.key);
            }
        }
    }
}

impl Drop for DialTicket {
    fn drop(&mut self) {
        // After `succeed` or `fail` the dial is no longer the key's, and this does nothing.
        self.clear();
    }
}

impl PooledConnection {
    fn claim(self: &Arc<Self>) -> Option<StreamClaim> {
        // The server may allow fewer streams than we would open: past its limit a stream would
        // wait for one to finish instead of going on another connection.
        let max_streams = self.max_streams.min(self.sender.current_max_send_streams());
        let claimed = self.streams.send_if_modified(|open| {
            let room = *open < max_streams;
            if room {
                *open += 1;
            }
            room
        });
        claimed.then(|| {
            self.pool_streams.fetch_add(1, Ordering::Relaxed);
            StreamClaim(self.clone())
        })
    }

    /// Whether a new stream may go on this connection: not retired or expired, and h2 can
    /// still open streams on it (no GOAWAY received, the connection task still running).
    fn usable(&self) -> bool {
        if *self.retired.borrow() || Instant::now() >= self.expires {
            return false;
        }
        // A fresh handle has no stream of its own pending, so h2 answers at once: `Ready(Err)`
        // once the connection has an error (GOAWAY, closed), `Ready(Ok)` otherwise.
        let mut sender = self.sender.clone();
        let mut context = Context::from_waker(Waker::noop());
        matches!(sender.poll_ready(&mut context), Poll::Ready(Ok(())))
    }

    fn retire(&self) {
        self.retired.send_replace(true);
    }
}

impl StreamClaim {
    /// The handle that opens the stream on the claimed connection.
    pub(crate) fn sender(&self) -> SendRequest<Bytes> {
        self.0.sender.clone()
    }

    /// Takes the claimed connection out of the pool: it refused a new stream.
    pub(crate) fn retire(&self) {
        self.0.retire();
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        self.0.streams.send_modify(|open| *open -= 1);
        self.0.pool_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for StreamClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StreamClaim").field(&self.0.id).finish()
    }
}

/// The monotonic instant of a wall-clock time; now for a time already past.
fn instant_of(time: SystemTime) -> Instant {
    after(time.duration_since(SystemTime::now()).unwrap_or_default())
}

/// `duration` from now; a century for a duration too long to add.
fn after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;

    use super::*;
    use crate::hbone::DialStage;

    fn key() -> PoolKey {
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        PoolKey {
            source: identity.clone(),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination: "10.0.0.2:15008".parse().unwrap(),
            expected: vec![identity],
        }
    }

    /// A checkout whose dial, if it is the one to dial, takes a second and then times out.
    fn checkout(pool: &Pool, dials: &Arc<AtomicUsize>) -> JoinHandle<ConnectError> {
        let (pool, dials) = (pool.clone(), dials.clone());
        tokio::spawn(async move {
            let dial = async || {
                dials.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Err(ConnectError::DialTimeout {
                    addr: key().destination,
                    stage: DialStage::TlsHandshake,
                    timeout: Duration::from_secs(1),
                })
            };
            pool.checkout(&key(), dial).await.unwrap_err()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_share_one_failed_dial_and_leave_no_entry() {
        let pool = Pool::new(ClientSettings::default());
        let dials = Arc::<AtomicUsize>::default();
        let checkouts: Vec<_> = (0..5).map(|_| checkout(&pool, &dials)).collect();
        for checkout in checkouts {
            let err = checkout.await.unwrap();
            let ConnectError::SharedDial { source, .. } = &err else {
                panic!("expected the shared dial's error, got {err}");
            };
            assert!(
                matches!(**source, ConnectError::DialTimeout { .. }),
                "{source}"
            );
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(pool.keys(), 0);

        // Alone, a caller gets its dial's error itself.
        let err = checkout(&pool, &dials).await.unwrap();
        assert!(matches!(err, ConnectError::DialTimeout { .. }), "{err}");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(pool.keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dials_itself_when_the_dialer_gives_up() {
        let pool = Pool::new(ClientSettings::default());
        let dials = Arc::<AtomicUsize>::default();
        let dialer = checkout(&pool, &dials);
        tokio::task::yield_now().await;
        let waiter = checkout(&pool, &dials);
        tokio::task::yield_now().await;
        assert_eq!(dials.load(Ordering::SeqCst), 1);

        dialer.abort();
        let err = waiter.await.unwrap();
        assert!(matches!(err, ConnectError::DialTimeout { .. }), "{err}");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(pool.keys(), 0);
    }
}
