//! Graceful shutdown: every long-lived task holds a [`DrainWatcher`]; the [`DrainTrigger`] tells
//! them to wind down and waits, for a bounded time, until all of them have let go.

use std::time::Duration;

use tokio::sync::watch;

/// A new trigger and its first watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (sender, receiver) = watch::channel(false);
    (DrainTrigger(sender), DrainWatcher(receiver))
}

/// Starts a drain.
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

impl DrainTrigger {
    /// Signals every watcher and waits until all are dropped or `deadline` passes; tells whether
    /// everything finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.0.send_replace(true);
        tokio::time::timeout(deadline, self.0.closed())
            .await
            .is_ok()
    }
}

/// Held by a task for as long as it has work that a drain should wait for.
#[derive(Debug, Clone)]
pub struct DrainWatcher(watch::Receiver<bool>);

impl DrainWatcher {
    /// Resolves once a drain has started (or the trigger is gone).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|&draining| draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_watchers_until_the_deadline() {
        let (trigger, watcher) = channel();
        let mut quick = watcher.clone();
        tokio::spawn(async move { quick.signaled().await });
        let stuck = watcher;
        assert!(
            !trigger.drain(Duration::from_secs(5)).await,
            "a watcher is still held"
        );
        drop(stuck);

        let (trigger, mut watcher) = channel();
        tokio::spawn(async move { watcher.signaled().await });
        assert!(trigger.drain(Duration::from_secs(5)).await);
    }
}
