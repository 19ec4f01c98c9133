//! Privileged end-to-end tests and benchmarks of ambit on real network namespaces: nodes and
//! pods as namespaces joined by veth pairs ([`ambit_agent::topology`]), agents as child
//! processes ([`AgentProcess`]), apps as sockets inside the pods ([`InPod`]), and the cluster
//! file that ties them together ([`Cluster`]).
//!
//! Everything needs root; without it the harness fails with a message saying so, never passing
//! silently.

#![expect(
    clippy::expect_used,
    reason = "a harness that cannot build its cluster fails the test that asked for it"
)]

mod agent;
mod cluster;
mod pod;

pub use agent::{AgentProcess, binary};
pub use cluster::{Cluster, ClusterBuilder};
pub use pod::{EchoApp, InPod, read_peer_line};

/// Fails the test unless it runs as root: the harness creates namespaces and loads rules.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and nftables rules: run it as root (CI does)"
    );
}
