//! Accounting for one connection: it is counted in Istio's metrics when it opens and when it
//! closes, listed among the open connections while it lasts, and logged once, at close (tracing
//! target `access`): who talked to whom, through which path, how many bytes each way, for how
//! long, and why it failed if it did.

use std::error::Error;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use crate::authorize::DenyReason;
use crate::error_chain::ErrorChain;
use crate::telemetry::{
    Endpoints, Listed, Meter, Reporter, ResponseFlags, Telemetry, TrafficLabels,
};

/// One connection, from the moment its destination is known until it is logged.
#[derive(Debug)]
pub(crate) struct ConnectionRecord {
    telemetry: Arc<Telemetry>,
    listed: Listed,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Not yet carrying bytes: a failure now means the connection was never established.
    /// Boxed: the labels are large and freed once the connection is established.
    Opening(Box<TrafficLabels>),
    /// Carrying bytes; the labels are no longer held, only the counters they select.
    Established { meter: Meter, closed: Counter },
}

impl ConnectionRecord {
    /// Counts the connection as opened and lists it.
    pub(crate) fn open(
        telemetry: &Arc<Telemetry>,
        endpoints: Endpoints,
        labels: TrafficLabels,
    ) -> Self {
        telemetry
            .metrics
            .traffic
            .opened
            .get_or_create(&labels)
            .inc();
        Self {
            listed: telemetry.connections.open(endpoints),
            telemetry: telemetry.clone(),
            phase: Phase::Opening(Box::new(labels)),
        }
    }

    /// The connection is established: its bytes are counted from now on by the returned meter.
    pub(crate) fn establish(&mut self, reporter: Reporter) -> &Meter {
        if let Phase::Opening(labels) = &self.phase {
            let traffic = &self.telemetry.metrics.traffic;
            let client_bytes = traffic.received.get_or_create(labels).clone();
            let server_bytes = traffic.sent.get_or_create(labels).clone();
            // The metrics count from the client's side, the meter from the local pod's.
            let (sent, received) = match reporter {
                Reporter::Source => (client_bytes, server_bytes),
                Reporter::Destination => (server_bytes, client_bytes),
            };
            self.phase = Phase::Established {
                meter: Meter::new(self.listed.connection.clone(), sent, received),
                closed: traffic.closed.get_or_create(labels).clone(),
            };
        }
        match &self.phase {
            Phase::Established { meter, .. } => meter,
            Phase::Opening(_) => unreachable!("established just above"),
        }
    }

    /// Logs the connection's end; an error before it was established counts it as failed
    /// (`CONNECT`).
    pub(crate) fn finish<T, E: Error>(self, result: Result<T, E>) {
        let opening = matches!(self.phase, Phase::Opening(_));
        let flags = (opening && result.is_err()).then_some(ResponseFlags::Connect);
        let error = result.err().map(|e| ErrorChain(&e).to_string());
        self.close(flags, None, error);
    }

    /// Logs a connection that could not be established (`CONNECT`), or broke.
    pub(crate) fn fail(self, error: impl Error) {
        self.finish(Err::<(), _>(error));
    }

    /// Logs a connection that the destination's authorization refused (`DENY`).
    pub(crate) fn fail_denied(self, error: impl Error) {
        let error = ErrorChain(&error).to_string();
        self.close(Some(ResponseFlags::Deny), None, Some(error));
    }

    /// Logs a connection that authorization refused, naming the deciding policy if one did.
    pub(crate) fn deny(self, policy: Option<&str>, reason: DenyReason) {
        let reason = reason.as_str().to_owned();
        self.close(Some(ResponseFlags::Deny), policy, Some(reason));
    }

    /// Logs a connection closed because a policy change now denies it.
    pub(crate) fn revoke(self, policy: Option<&str>) {
        let reason = "closed: a policy change denies it".to_owned();
        self.close(Some(ResponseFlags::Deny), policy, Some(reason));
    }

    /// Counts the close, and the failure of a connection that was never established, then logs.
    fn close(self, flags: Option<ResponseFlags>, policy: Option<&str>, error: Option<String>) {
        let traffic = &self.telemetry.metrics.traffic;
        match &self.phase {
            Phase::Opening(labels) => {
                let labels = (**labels)
                    .clone()
                    .with_flags(flags.unwrap_or(ResponseFlags::Connect));
                traffic.closed.get_or_create(&labels).inc();
                traffic.failed.get_or_create(&labels).inc();
            }
            Phase::Established { closed, .. } => {
                closed.inc();
            }
        }
        let connection = &self.listed.connection;
        let endpoints = &connection.endpoints;
        let (sent, received) = connection.bytes();
        tracing::info!(
            target: "access",
            direction = endpoints.direction.as_str(),
            src.addr = %endpoints.src,
            dst.addr = %endpoints.dst,
            src.identity = endpoints.src_identity.as_ref().map(tracing::field::display),
            dst.identity = endpoints.dst_identity.as_ref().map(tracing::field::display),
            src.workload = endpoints.src_workload.as_deref(),
            dst.workload = endpoints.dst_workload.as_deref(),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = connection.started.elapsed().as_millis() as u64,
            response_flags = flags.map(ResponseFlags::as_str),
            policy,
            error,
            "connection closed"
        );
    }
}
