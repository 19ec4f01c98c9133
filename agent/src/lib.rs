//! The ambit node agent.
//!
//! Owns the data plane of one node: HBONE tunnels between workloads ([`HboneClient`],
//! [`HboneServer`]), graceful shutdown ([`drain`]), and the `ambit` command line ([`Cli`]).

pub mod drain;
pub mod lab;
pub mod sockets;
pub mod source;
pub mod state;

mod accept;
mod access;
mod app;
mod cli;
mod config;
mod demo;
mod enrolment;
mod error_chain;
mod hbone;
mod proxy;
mod readiness;

pub use cli::{Cli, Command};
pub use config::{AgentArgs, AgentConfig, ConfigError, LogFormat, RedirectKind, SourceKind};
pub use enrolment::EnrolError;
pub use hbone::{
    Baggage, ClientSettings, ConnectError, ConnectRequest, CopyError, HboneClient, HboneServer,
    Keepalive, KeepaliveError, ServerError, TraceParent, Transferred, Tunnel, WorkloadKind,
};
pub use proxy::ProxyError;
pub use readiness::READY_PATH;
