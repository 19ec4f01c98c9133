//! The accept loop every listener of the agent runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::drain::DrainWatcher;

/// Pause after a failed accept (such as running out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A listener logs failed accepts at most this often.
const ACCEPT_ERROR_INTERVAL: Duration = Duration::from_secs(1);

/// Accepts on `listener` until a drain starts, handing each connection to `handle` on a task of
/// its own, with a drain watcher that the handler keeps until the connection ends: a drain waits
/// for the connections already accepted, while the listener itself closes as soon as it starts.
///
/// The handler takes the watcher rather than being wrapped in a future that holds it: an async
/// block that awaits a future it captured stores that future twice, doubling every task.
pub(crate) async fn serve_listener<F, Fut>(
    listener: TcpListener,
    mut drain: DrainWatcher,
    name: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, DrainWatcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut last_error: Option<Instant> = None;
    let mut unlogged = 0_u64;
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(handle(tcp, peer, drain.clone()));
                }
                Err(error) => {
                    if last_error.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_INTERVAL) {
                        tracing::warn!(listener = name, %error, unlogged, "accept failed");
                        (last_error, unlogged) = (Some(Instant::now()), 0);
                    } else {
                        unlogged += 1;
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}
