//! The ambit node agent.
//!
//! Owns the data plane of one node: HBONE tunnels between workloads ([`HboneClient`],
//! [`HboneServer`]), graceful shutdown ([`drain`]), and the `ambit` command line ([`Cli`]).

pub mod drain;

mod cli;
mod hbone;
pub mod sockets;
pub mod source;
pub mod state;

pub use cli::{Cli, Command};
pub use hbone::{
    Baggage, ClientSettings, ConnectError, ConnectRequest, CopyError, HboneClient, HboneServer,
    Keepalive, KeepaliveError, ServerError, TraceParent, Transferred, Tunnel, WorkloadKind,
};
