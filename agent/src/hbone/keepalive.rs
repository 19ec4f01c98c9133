//! HTTP/2 PING keepalive: the only way to notice a peer that vanished without closing.

use h2::{Ping, PingPong};

use super::Keepalive;

/// Why a connection's keepalive gave up.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error("the peer did not answer a PING within {0:?}")]
    Timeout(std::time::Duration),
    #[error("failed to send a PING")]
    Ping(#[source] h2::Error),
}

/// Sends a PING every `interval` while the connection lives; returns once one goes unanswered.
pub(crate) async fn run(mut pings: PingPong, keepalive: Keepalive) -> KeepaliveError {
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return KeepaliveError::Ping(error),
            Err(_) => return KeepaliveError::Timeout(keepalive.timeout),
        }
    }
}
