//! Graceful shutdown: every long-lived task, and every connection a proxy carries, holds a
//! [`DrainWatcher`]; the [`DrainTrigger`] tells them to wind down and waits until all of them
//! have let go. Drains nest: a pod's proxies have a trigger of their own, and the task that
//! drains them holds the agent's watcher meanwhile.

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
    /// Signals every watcher and resolves once all of them are dropped; callers bound the wait
    /// with their own deadline.
    pub async fn drain(self) {
        self.0.send_replace(true);
        self.0.closed().await;
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
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_watcher() {
        let (trigger, watcher) = channel();
        let mut quick = watcher.clone();
        tokio::spawn(async move { quick.signaled().await });
        let stuck = watcher;
        let drained = tokio::time::timeout(Duration::from_secs(5), trigger.drain()).await;
        assert!(drained.is_err(), "a watcher is still held");
        drop(stuck);

        let (trigger, mut watcher) = channel();
        tokio::spawn(async move { watcher.signaled().await });
        let drained = tokio::time::timeout(Duration::from_secs(5), trigger.drain()).await;
        assert!(drained.is_ok());
    }
}
