//! Pooled HBONE connections: many CONNECT streams share one mTLS connection.
//!
//! Connections are keyed by everything that makes two of them interchangeable: the source
//! identity and IP, the destination, and the identities the server may prove. A key has at most
//! one dial in flight; a connection carries at most `max_streams_per_connection` streams, and
//! is closed once it has carried none for `idle_timeout`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ambit_identity::Identity;
use bytes::Bytes;
use h2::PingPong;
use h2::client::{Connection, SendRequest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

use super::client::ConnectError;
use super::{ClientSettings, keepalive};

/// How long a closing connection may take to say GOAWAY and flush.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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
}

#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    settings: ClientSettings,
    keys: Mutex<HashMap<PoolKey, KeyConnections>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct KeyConnections {
    /// Held while dialing, so that concurrent callers wait for one dial instead of racing.
    dialing: Arc<tokio::sync::Mutex<()>>,
    connections: Vec<Arc<PooledConnection>>,
}

struct PooledConnection {
    id: u64,
    sender: SendRequest<Bytes>,
    /// Streams open on this connection; watched to notice when it goes idle.
    streams: watch::Sender<usize>,
    max_streams: usize,
}

/// The right to open one stream on a pooled connection; gives the slot back when dropped.
pub(crate) struct StreamClaim(Arc<PooledConnection>);

impl Pool {
    pub(crate) fn new(settings: ClientSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                keys: Mutex::default(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// A stream slot on a pooled connection for `key`, dialing one with `dial` when none has
    /// room.
    pub(crate) async fn checkout<F, Fut>(
        &self,
        key: &PoolKey,
        dial: F,
    ) -> Result<StreamClaim, ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialed, ConnectError>>,
    {
        if let Some(claim) = self.claim(key) {
            return Ok(claim);
        }
        let dialing = self.lock().entry(key.clone()).or_default().dialing.clone();
        let _dialing = dialing.lock().await;
        if let Some(claim) = self.claim(key) {
            return Ok(claim);
        }

        let dialed = dial().await?;
        let connection = Arc::new(PooledConnection {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            sender: dialed.sender,
            streams: watch::Sender::new(0),
            max_streams: self.shared.settings.max_streams_per_connection.max(1),
        });
        // A new connection has room for at least one stream.
        let claim = connection
            .claim()
            .unwrap_or_else(|| unreachable!("a new connection has free stream slots"));
        self.lock()
            .entry(key.clone())
            .or_default()
            .connections
            .push(connection.clone());
        tokio::spawn(
            self.clone()
                .drive(key.clone(), connection, dialed.connection, dialed.pings),
        );
        Ok(claim)
    }

    /// Connections currently pooled, over all keys.
    pub(crate) fn connections(&self) -> usize {
        self.lock().values().map(|k| k.connections.len()).sum()
    }

    /// Streams open on the pooled connections.
    pub(crate) fn streams(&self) -> usize {
        self.lock()
            .values()
            .flat_map(|k| &k.connections)
            .map(|c| *c.streams.borrow())
            .sum()
    }

    fn claim(&self, key: &PoolKey) -> Option<StreamClaim> {
        let keys = self.lock();
        keys.get(key)?
            .connections
            .iter()
            .find_map(PooledConnection::claim)
    }

    /// Runs one connection until it fails, stops answering PINGs, or idles out; then drops it
    /// from the pool.
    async fn drive(
        self,
        key: PoolKey,
        pooled: Arc<PooledConnection>,
        connection: Connection<TlsStream<TcpStream>, Bytes>,
        pings: PingPong,
    ) {
        let id = pooled.id;
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(dst.addr = %key.destination, %error, "pooled HBONE connection failed");
                }
            }
            error = keepalive::run(pings, self.shared.settings.keepalive) => {
                tracing::warn!(dst.addr = %key.destination, %error, "closing unresponsive HBONE connection");
            }
            () = self.idle(&key, pooled) => {
                // Every handle is gone now, so h2 says GOAWAY and finishes.
                let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
            }
        }
        self.remove(&key, |c| c.id == id);
    }

    /// Returns once `pooled` has carried no stream for the idle timeout and left the pool.
    async fn idle(&self, key: &PoolKey, pooled: Arc<PooledConnection>) {
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
            // Claims are made under the same lock, so none can slip in between check and removal.
            if self.remove(key, |c| Arc::ptr_eq(c, &pooled) && *c.streams.borrow() == 0) {
                return;
            }
        }
    }

    /// Removes the connection of `key` that `matches`; drops the key once it has nothing left.
    fn remove(&self, key: &PoolKey, matches: impl Fn(&Arc<PooledConnection>) -> bool) -> bool {
        let mut keys = self.lock();
        let Some(entry) = keys.get_mut(key) else {
            return false;
        };
        let before = entry.connections.len();
        entry.connections.retain(|c| !matches(c));
        let removed = entry.connections.len() < before;
        if entry.connections.is_empty() && Arc::strong_count(&entry.dialing) == 1 {
            keys.remove(key);
        }
        removed
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

impl PooledConnection {
    fn claim(self: &Arc<Self>) -> Option<StreamClaim> {
        let claimed = self.streams.send_if_modified(|open| {
            let room = *open < self.max_streams;
            if room {
                *open += 1;
            }
            room
        });
        claimed.then(|| StreamClaim(self.clone()))
    }
}

impl StreamClaim {
    /// The handle that opens the stream on the claimed connection.
    pub(crate) fn sender(&self) -> SendRequest<Bytes> {
        self.0.sender.clone()
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        self.0.streams.send_modify(|open| *open -= 1);
    }
}

impl std::fmt::Debug for StreamClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StreamClaim").field(&self.0.id).finish()
    }
}
