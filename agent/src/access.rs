//! One log line per connection, at close (tracing target `access`): who talked to whom, through
//! which path, how many bytes each way, for how long, and why it failed if it did.

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use ambit_identity::Identity;

use crate::authorize::DenyReason;
use crate::error_chain::ErrorChain;
use crate::hbone::{CopyError, Transferred};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    Outbound,
    InboundHbone,
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::InboundHbone => "inbound",
            Self::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// What is known of a connection so far; logged once, when it ends.
#[derive(Debug)]
pub(crate) struct AccessLog {
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    pub(crate) src_identity: Option<Identity>,
    pub(crate) dst_identity: Option<Identity>,
    pub(crate) src_workload: Option<String>,
    pub(crate) dst_workload: Option<String>,
}

impl AccessLog {
    pub(crate) fn new(
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        started: Instant,
    ) -> Self {
        Self {
            direction,
            src,
            dst,
            started,
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
        }
    }

    /// Logs a tunneled connection that ran its course.
    pub(crate) fn finish(self, copied: Result<Transferred, CopyError>) {
        match copied {
            Ok(transferred) => self.emit(transferred.sent, transferred.received, Outcome::Closed),
            Err(error) => self.emit(0, 0, Outcome::Failed(&error)),
        }
    }

    /// Logs a plain TCP connection that ran its course.
    pub(crate) fn finish_plain(self, copied: io::Result<(u64, u64)>) {
        match copied {
            Ok((sent, received)) => self.emit(sent, received, Outcome::Closed),
            Err(error) => self.emit(0, 0, Outcome::Failed(&error)),
        }
    }

    /// Logs a connection that never got through.
    pub(crate) fn fail(self, error: &dyn Error) {
        self.emit(0, 0, Outcome::Failed(error));
    }

    /// Logs a connection that authorization refused, naming the deciding policy if one did.
    pub(crate) fn deny(self, policy: Option<&str>, reason: DenyReason) {
        let reason = reason.as_str();
        self.emit(0, 0, Outcome::Denied { policy, reason });
    }

    /// Logs a connection closed because a policy change now denies it.
    pub(crate) fn revoke(self, policy: Option<&str>) {
        let reason = "closed: a policy change denies it";
        self.emit(0, 0, Outcome::Denied { policy, reason });
    }

    fn emit(&self, sent: u64, received: u64, outcome: Outcome<'_>) {
        let (error, response_flags, policy) = match &outcome {
            Outcome::Closed => (None, None, None),
            Outcome::Failed(error) => (Some(ErrorChain(*error).to_string()), None, None),
            Outcome::Denied { policy, reason } => {
                (Some((*reason).to_owned()), Some("DENY"), *policy)
            }
        };
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.src,
            dst.addr = %self.dst,
            src.identity = self.src_identity.as_ref().map(display),
            dst.identity = self.dst_identity.as_ref().map(display),
            src.workload = self.src_workload.as_deref(),
            dst.workload = self.dst_workload.as_deref(),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            response_flags,
            policy,
            error,
            "connection closed"
        );
    }
}

/// How a connection ended.
enum Outcome<'a> {
    Closed,
    Failed(&'a dyn Error),
    Denied {
        policy: Option<&'a str>,
        reason: &'a str,
    },
}
