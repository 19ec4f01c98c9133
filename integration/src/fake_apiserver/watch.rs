//! Watches: newline-delimited JSON events replayed from the history after the requested
//! version, then live ones, with bookmarks, a timeout, and a `410 Expired` error event when the
//! version is no longer (or not yet) in the history.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::{Channel, Sender};
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};

use super::query::Query;
use super::routes::Target;
use super::selectors::Selection;
use super::state::State;
use super::status::Refusal;
use super::store::{Change, Event, Version};

/// Events buffered per watch before the stream waits for the client.
const BUFFERED_EVENTS: usize = 64;

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// An `ADDED` event for every current object, then the changes after it.
    Now,
    /// The changes after this version.
    After(Version),
}

#[derive(Debug)]
struct WatchStream {
    state: Arc<State>,
    target: Target,
    selection: Selection,
    bookmarks: bool,
    deadline: Option<Instant>,
    sender: Sender<Bytes>,
}

/// Starts the watch `query` asks for and returns the body its events are streamed into.
pub(super) fn start(
    state: Arc<State>,
    target: Target,
    query: &Query,
) -> Result<Channel<Bytes>, Refusal> {
    let selection = query.selection(&target)?;
    let start = match query.resource_version.as_deref() {
        None | Some("0") => Start::Now,
        Some(text) => Start::After(text.parse().map_err(|_| {
            Refusal::bad_request(format!("resourceVersion: invalid value {text:?}"))
        })?),
    };
    let (sender, body) = Channel::new(BUFFERED_EVENTS);
    let stream = WatchStream {
        state,
        target,
        selection,
        bookmarks: query.allow_watch_bookmarks,
        deadline: query
            .timeout_seconds
            .map(|seconds| Instant::now() + Duration::from_secs(seconds)),
        sender,
    };
    tokio::spawn(stream.run(start));
    Ok(body)
}

impl WatchStream {
    /// Streams until the timeout, a compaction, an expired version or the client leaving.
    async fn run(mut self, start: Start) {
        let (mut changes, mut compactions) = self.state.subscribe();
        let mut cursor = match start {
            Start::After(version) => version,
            Start::Now => match self.send_current().await {
                Some(version) => version,
                None => return,
            },
        };
        let mut bookmarks = tokio::time::interval_at(
            Instant::now() + self.state.bookmark_interval,
            self.state.bookmark_interval,
        );
        bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let deadline = self.deadline;
        let timeout = async move {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        loop {
            cursor = match self.send_after(cursor).await {
                Some(version) => version,
                None => return,
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(self.state.watch_delay).await;
                }
                _ = compactions.changed() => return,
                _ = bookmarks.tick(), if self.bookmarks => {
                    if !self.send("BOOKMARK", &self.bookmark(cursor)).await {
                        return;
                    }
                }
                () = &mut timeout => return,
            }
        }
    }

    /// Sends the current objects as `ADDED`; returns their version.
    async fn send_current(&mut self) -> Option<Version> {
        let (version, objects) = {
            let store = self.state.store();
            let version = store.latest();
            (version, store.snapshot(self.target.resource, version).ok()?)
        };
        let selected: Vec<Value> = objects
            .values()
            .filter(|o| self.selection.matches(o))
            .map(|o| self.target.typed(o))
            .collect();
        for object in &selected {
            if !self.send("ADDED", object).await {
                return None;
            }
        }
        Some(version)
    }

    /// Sends the events after `cursor`; returns the version the watch has now seen, or `None`
    /// when the stream ended.
    async fn send_after(&mut self, cursor: Version) -> Option<Version> {
        let events = {
            let store = self.state.store();
            store
                .events_after(cursor)
                .map(|events| (events, store.latest()))
        };
        match events {
            Ok((events, latest)) => {
                for event in &events {
                    if let Some(kind) = self.visible_change(event)
                        && !self.send(kind, &self.target.typed(&event.object)).await
                    {
                        return None;
                    }
                }
                Some(latest)
            }
            Err(too_old) => {
                let status = Refusal::too_old(cursor, too_old.oldest).status();
                self.send("ERROR", &status).await;
                None
            }
        }
    }

    /// How this watch sees `event`: an object that starts or stops matching its selector is
    /// added or deleted, as the real server reports it.
    fn visible_change(&self, event: &Event) -> Option<&'static str> {
        if event.key.resource != self.target.resource {
            return None;
        }
        let now = self.selection.matches(&event.object);
        let before = event
            .previous
            .as_ref()
            .is_some_and(|previous| self.selection.matches(previous));
        match (event.change, before, now) {
            (Change::Added, _, true) => Some("ADDED"),
            (Change::Modified, true, true) => Some("MODIFIED"),
            (Change::Modified, false, true) => Some("ADDED"),
            (Change::Modified, true, false) | (Change::Deleted, true, _) => Some("DELETED"),
            _ => None,
        }
    }

    fn bookmark(&self, version: Version) -> Value {
        let resource = self.target.resource.resource();
        json!({
            "kind": resource.kind,
            "apiVersion": resource.api_version(&self.target.version),
            "metadata": {"resourceVersion": version.to_string()},
        })
    }

    /// Sends one event; `false` when the client has gone.
    async fn send(&mut self, kind: &str, object: &Value) -> bool {
        let mut line =
            serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        self.sender.send_data(Bytes::from(line)).await.is_ok()
    }
}
