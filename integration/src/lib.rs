//! Privileged end-to-end tests and benchmarks of ambit on real network namespaces, built with
//! `ambit_agent::lab`: nodes and pods as namespaces joined by veth pairs, agents as child
//! processes, apps as sockets inside the pods.
//!
//! Everything needs root; without it the tests fail with a message saying so, never passing
//! silently.

use std::path::PathBuf;

use ambit_agent::lab::{Cluster, ClusterBuilder};

/// The `ambit` binary built next to the running test or benchmark (`AMBIT_BIN` overrides it).
/// Cargo builds it with the workspace's tests; on its own, `cargo build -p ambit-agent`.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AMBIT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = match exe.parent() {
        Some(deps) if deps.ends_with("deps") => deps.parent().unwrap_or(deps),
        Some(dir) => dir,
        None => exe.as_path(),
    };
    profile_dir.join("ambit")
}

/// Two teams on two nodes: `client` (namespace `shop`) and `admin` (`ops`) in the mesh on node1,
/// `server` (`shop`) in the mesh on node2, and `outsider` (`legacy`, outside the mesh) on node2.
pub fn two_teams() -> ClusterBuilder {
    Cluster::builder(&agent_binary())
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .ambient_namespace("ops")
        .namespace("legacy")
        .pod("node1", "shop", "client")
        .pod("node1", "ops", "admin")
        .pod("node2", "shop", "server")
        .pod("node2", "legacy", "outsider")
}

/// In [`two_teams`]: only `client` may connect to `server`.
pub const ALLOW_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
";
