//! Accounting for one connection: it is counted in Istio's metrics when it opens and when it
//! closes, listed among the open connections while it lasts, and logged once, at close (tracing
//! target `access`): who talked to whom, through which path, how many bytes each way, for how
//! long, and why it failed if it did.
//!
//! A connection is first a [`ConnectionRecord`]: refused or failing now, it was never established
//! and counts as failed. Once it carries bytes it is an [`Established`] connection.

use std::error::Error;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use crate::authorize::{DenyReason, RevokedFuture, Verdict};
use crate::error_chain::ErrorChain;
use crate::telemetry::{
    Direction, Endpoints, Listed, Meter, Reporter, ResponseFlags, Telemetry, TrafficLabels,
};

/// A connection whose destination is known and that carries no bytes yet.
#[derive(Debug)]
pub(crate) struct ConnectionRecord {
    telemetry: Arc<Telemetry>,
    listed: Listed,
}

/// A connection carrying bytes; it holds the counters its labels selected.
#[derive(Debug)]
pub(crate) struct Established {
    listed: Listed,
    meter: Meter,
    closed: Counter,
}

impl ConnectionRecord {
    /// Counts the connection as opened and lists it.
    pub(crate) fn open(
        telemetry: &Arc<Telemetry>,
        endpoints: Endpoints,
        labels: TrafficLabels,
    ) -> Self {
        let series = telemetry.metrics.opened(labels);
        Self {
            listed: telemetry.connections.open(endpoints, series),
            telemetry: telemetry.clone(),
        }
    }

    /// The connection carries bytes from now on.
    pub(crate) fn establish(self) -> Established {
        let connection = &self.listed.connection;
        let carried = connection.series.carried(&self.telemetry.metrics.traffic);
        let (client_bytes, server_bytes) = (&carried.client_bytes, &carried.server_bytes);
        // The metrics count from the client's side, the meter from the local pod's.
        let (sent, received) = match connection.endpoints.direction.reporter() {
            Reporter::Source => (client_bytes, server_bytes),
            Reporter::Destination => (server_bytes, client_bytes),
        };
        Established {
            meter: Meter::new(connection.clone(), sent.clone(), received.clone()),
            closed: carried.closed.clone(),
            listed: self.listed,
        }
    }

    /// The connection could not be established (`CONNECT`).
    pub(crate) fn fail(self, error: impl Error) {
        let error = ErrorChain(&error).to_string();
        self.refuse(ResponseFlags::Connect, None, error);
    }

    /// The destination's authorization refused the tunnel (`DENY`).
    pub(crate) fn fail_denied(self, error: impl Error) {
        let error = ErrorChain(&error).to_string();
        self.refuse(ResponseFlags::Deny, None, error);
    }

    /// Authorization refused the connection, by the named policy if one decided.
    pub(crate) fn deny(self, policy: Option<&str>, reason: DenyReason) {
        self.refuse(ResponseFlags::Deny, policy, reason.as_str().to_owned());
    }

    fn refuse(self, flags: ResponseFlags, policy: Option<&str>, error: String) {
        let traffic = &self.telemetry.metrics.traffic;
        let labels = self.listed.connection.series.labels().with_flags(flags);
        traffic.closed.get_or_create(&labels).inc();
        traffic.failed.get_or_create(&labels).inc();
        log(&self.listed, Some(flags), policy, Some(error));
    }
}

impl Established {
    /// Counts the bytes as they are copied.
    pub(crate) fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Copies with `copy` until both sides close or `revoked` says a policy change now denies
    /// the connection, then logs how it ended.
    pub(crate) async fn carry_until_revoked<T, E: Error>(
        self,
        copy: impl AsyncFnOnce(&Meter) -> Result<T, E>,
        revoked: RevokedFuture,
    ) {
        let copied = tokio::select! {
            copied = copy(&self.meter) => Ok(copied),
            Verdict::Deny { policy, .. } = revoked => Err(policy),
        };
        match copied {
            Ok(copied) => self.finish(copied),
            Err(policy) => self.revoke(policy.as_deref()),
        }
    }

    /// The connection ended: both sides closed, or copying failed.
    pub(crate) fn finish<T, E: Error>(self, result: Result<T, E>) {
        self.closed.inc();
        let error = result.err().map(|e| ErrorChain(&e).to_string());
        log(&self.listed, None, None, error);
    }

    /// A policy change now denies the connection; it is closed.
    fn revoke(self, policy: Option<&str>) {
        self.closed.inc();
        let reason = "closed: a policy change denies it".to_owned();
        log(
            &self.listed,
            Some(ResponseFlags::Deny),
            policy,
            Some(reason),
        );
    }
}

impl Direction {
    /// Which end reports a connection this proxy carries.
    fn reporter(self) -> Reporter {
        match self {
            Self::Outbound => Reporter::Source,
            Self::Inbound | Self::InboundPlaintext => Reporter::Destination,
        }
    }
}

/// The access-log line of a connection that ended.
fn log(listed: &Listed, flags: Option<ResponseFlags>, policy: Option<&str>, error: Option<String>) {
    let connection = &listed.connection;
    let endpoints = &connection.endpoints;
    let (sent, received) = connection.bytes();
    let [src, dst] = connection.series.labels().placements();
    tracing::info!(
        target: "access",
        direction = endpoints.direction.as_str(),
        src.addr = %endpoints.src,
        dst.addr = %endpoints.dst,
        src.identity = endpoints.src_identity.as_ref().map(tracing::field::display),
        dst.identity = endpoints.dst_identity.as_ref().map(tracing::field::display),
        src.workload = endpoints.src_workload.as_deref(),
        dst.workload = endpoints.dst_workload.as_deref(),
        src.cluster = src.cluster,
        src.region = src.region,
        src.zone = src.zone,
        dst.cluster = dst.cluster,
        dst.region = dst.region,
        dst.zone = dst.zone,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = connection.started.elapsed().as_millis() as u64,
        response_flags = flags.map(ResponseFlags::as_str),
        policy,
        error,
        trace_id = endpoints.trace_id.map(|id| tracing::field::display(TraceId(id))),
        "connection closed"
    );
}

/// A W3C trace id as `traceparent` writes it: 32 lowercase hex digits.
pub(crate) struct TraceId(pub(crate) u128);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}
