//! Capture backends: what steers a pod's TCP to the agent's sockets inside it.

mod nftables;

pub use nftables::Nftables;

use crate::netns::NetnsError;
use crate::routing::RoutingError;

/// Why capture could not be switched on or off for a pod.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("failed to run nft")]
    RunNft(#[source] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Nft(String),
    #[error("failed to set up policy routing")]
    Routing(#[source] RoutingError),
    #[error("failed to reach the pod's network namespace")]
    Netns(#[source] NetnsError),
}

/// A way of capturing a pod's traffic. Both methods run inside the pod's namespace (on its
/// [`PodNetns`](crate::PodNetns) thread), are idempotent, and replace whatever an earlier run of
/// the agent left behind.
pub trait CaptureBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Starts capturing: from now on the pod's TCP goes to the agent's sockets, or nowhere.
    fn enable(&self) -> Result<(), CaptureError>;

    /// Stops capturing and removes every trace of it.
    fn disable(&self) -> Result<(), CaptureError>;

    /// Whether capture is active in the calling thread's namespace.
    fn is_enabled(&self) -> Result<bool, CaptureError>;
}
