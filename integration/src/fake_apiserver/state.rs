//! What every request handler shares: the store behind a lock, and the signals that wake
//! watches.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::store::{Store, Version};

#[derive(Debug)]
pub(super) struct State {
    store: Mutex<Store>,
    /// The latest version, sent after every write so that watches wake.
    changes: watch::Sender<Version>,
    /// Counts compactions; each ends every open watch.
    compactions: watch::Sender<u64>,
    /// The bearer token every request must present.
    pub(super) token: String,
    pub(super) tokens_file: Option<PathBuf>,
    pub(super) bookmark_interval: Duration,
    /// How late watches see each change.
    pub(super) watch_delay: Duration,
    /// `host:port` as clients reach the server, for `/api`.
    pub(super) server_address: String,
}

impl State {
    pub(super) fn new(
        store: Store,
        token: String,
        tokens_file: Option<PathBuf>,
        bookmark_interval: Duration,
        watch_delay: Duration,
        server_address: String,
    ) -> Self {
        let (changes, _) = watch::channel(store.latest());
        let (compactions, _) = watch::channel(0);
        Self {
            store: Mutex::new(store),
            changes,
            compactions,
            token,
            tokens_file,
            bookmark_interval,
            watch_delay,
            server_address,
        }
    }

    /// The store, for reading.
    pub(super) fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-written: the store does
        // not panic between its checks and its writes.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `write` on the store, then wakes the watches.
    pub(super) fn write<T>(&self, write: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store();
        let result = write(&mut store);
        let latest = store.latest();
        drop(store);
        self.changes
            .send_if_modified(|seen| std::mem::replace(seen, latest) != latest);
        result
    }

    /// Drops the history and ends every watch.
    pub(super) fn compact(&self) {
        self.write(Store::compact);
        self.compactions.send_modify(|count| *count += 1);
    }

    pub(super) fn subscribe(&self) -> (watch::Receiver<Version>, watch::Receiver<u64>) {
        (self.changes.subscribe(), self.compactions.subscribe())
    }
}
