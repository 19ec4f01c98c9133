//! The ambit node agent.
//!
//! Owns the data plane of one node. The composition root (`app`) reads the cluster
//! ([`source`] into [`state`]), keeps the node's enrolled pods captured (`enrolment`), and runs,
//! inside each pod, the outbound, inbound-HBONE and inbound-plaintext proxies (`proxy`) on top of
//! HBONE ([`HboneClient`], [`HboneServer`]). Long-lived tasks stop through [`drain`]; sockets
//! come from a [`sockets::SocketFactory`]. The `ambit` command line is [`Cli`]; `ambit demo` runs
//! on the namespace [`lab`]; `ambit cni` puts ambit's chained plugin into the node's CNI
//! configuration ([`CniConfDir`], [`CniBinDir`]); `ambit ca` serves Istio's certificate service
//! ([`CaArgs`]).

pub mod admin;
pub mod authorize;
pub mod drain;
pub mod egress;
pub mod lab;
pub mod policy;
pub mod sockets;
pub mod source;
pub mod state;
pub mod telemetry;

mod accept;
mod access;
mod admission;
mod app;
mod balance;
mod ca_command;
mod cli;
mod cni_install;
mod cni_server;
mod config;
mod debug;
mod demo;
mod dns;
mod enrolment;
mod error_chain;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod handover;
mod hbone;
mod http_server;
mod logging;
mod node_listeners;
mod proxy;
mod readiness;
mod revocation;
mod sandboxes;
mod waypoint;

pub use admission::PendingLimits;
pub use ca_command::CaArgs;
pub use cli::{Cli, Command};
pub use cni_install::{
    ApiServerUrl, CniArgs, CniBinDir, CniConfDir, CniInstallError, ConfDirLock, ConfigChange,
    KubeconfigSource, NetworkConfigError, PluginEntry,
};
pub use config::{AgentArgs, AgentConfig, ConfigError, LogFormat, RedirectKind, SourceKind};
pub use debug::DebugArgs;
pub use enrolment::EnrolError;
pub use hbone::{
    Baggage, ClientSettings, ConnectError, ConnectRequest, CopyError, DialStage, EarlyBytes,
    HboneClient, HboneServer, Keepalive, KeepaliveError, ServerError, TraceParent, Transferred,
    Tunnel, WorkloadKind,
};
pub use proxy::ProxyError;
pub use readiness::READY_PATH;
pub use waypoint::WaypointArgs;
