//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS, as ztunnel speaks it.
//!
//! [`HboneClient`] opens tunnels through a pool of TLS connections keyed by who is calling whom;
//! [`HboneServer`] accepts them in front of one workload and connects each stream to the app.
//! Both sides copy bytes with end-to-end flow control ([`stream`]), so a slow reader slows the
//! writer instead of growing a buffer.

mod client;
mod headers;
mod keepalive;
mod pool;
mod server;
mod stream;

use std::time::Duration;

pub use client::{ConnectError, ConnectRequest, DialStage, EarlyBytes, HboneClient, Tunnel};
#[cfg(fuzzing)]
pub(crate) use headers::{BAGGAGE, TRACEPARENT, connect_request, destination};
pub use headers::{Baggage, TraceParent, WorkloadKind};
pub(crate) use headers::{authority, trace};
pub use keepalive::KeepaliveError;
pub use server::{HboneServer, ServerError};
pub(crate) use server::{Peer, StreamHandler, reply};
pub use stream::{CopyError, Transferred};
pub(crate) use stream::{H2Io, H2Stream, read_early};

/// Per-stream receive window.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window, shared by all streams.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Plaintext rustls buffers before it wants a flush: large enough for a full read from TCP, so that
/// bulk transfers are not cut into many small writes.
const TLS_BUFFER_LIMIT: usize = 1024 * 1024;
/// Streams one server accepts concurrently on a connection.
const SERVER_MAX_STREAMS: u32 = 200;
/// The largest header list (decoded, as HTTP/2 counts it) either side accepts: a CONNECT needs
/// well under 1 KiB, so this only stops a peer from making us buffer and decode megabytes.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// How the client side of HBONE uses its pooled connections.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Streams opened concurrently on one pooled connection before another is dialed.
    pub max_streams_per_connection: usize,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// How long dialing a new connection (TCP, TLS and HTTP/2 handshakes) may take.
    pub connect_timeout: Duration,
    /// How long the server may take to answer a CONNECT once it is sent; it answers only after
    /// the app accepted the connection, so this bounds that too.
    pub response_timeout: Duration,
    /// A pooled connection takes no new stream once it is this old; its open streams finish,
    /// then it closes. It never outlives either certificate that authenticated it, whatever
    /// this says.
    pub max_connection_age: Duration,
    pub keepalive: Keepalive,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            max_connection_age: Duration::from_secs(60 * 60),
            keepalive: Keepalive::default(),
        }
    }
}

/// HTTP/2 PINGs that detect a dead peer on an otherwise quiet connection.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    /// A connection whose PING is not answered within this time is closed.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}
