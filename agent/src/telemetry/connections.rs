//! The connections open right now, with their identities and bytes so far: what
//! `ambit debug connections` lists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use ambit_identity::Identity;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Series;

/// Which proxy carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From an enrolled pod, through the outbound proxy.
    Outbound,
    /// Into an enrolled pod, through HBONE.
    Inbound,
    /// Into an enrolled pod, as plain TCP from outside the mesh.
    InboundPlaintext,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// What is known of a connection when it is opened.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub(crate) direction: Direction,
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) src_identity: Option<Identity>,
    pub(crate) dst_identity: Option<Identity>,
    /// `namespace/pod`.
    pub(crate) src_workload: Option<String>,
    pub(crate) dst_workload: Option<String>,
    /// The W3C trace the connection belongs to, when the tunnel carried one.
    pub(crate) trace_id: Option<u128>,
}

/// One open connection; its bytes are counted as they are copied.
#[derive(Debug)]
pub(crate) struct LiveConnection {
    pub(crate) endpoints: Endpoints,
    /// Its Istio series, whose labels say where each end is (cluster, region, zone).
    pub(crate) series: Arc<Series>,
    pub(crate) started: Instant,
    opened_at: SystemTime,
    /// Bytes the local pod sent and received.
    sent: AtomicU64,
    received: AtomicU64,
}

impl LiveConnection {
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// The open connections of the node.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<LiveConnection>>>,
}

impl Connections {
    /// Lists a connection until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>, endpoints: Endpoints, series: Arc<Series>) -> Listed {
        let connection = Arc::new(LiveConnection {
            endpoints,
            series,
            started: Instant::now(),
            opened_at: SystemTime::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, connection.clone());
        Listed {
            id,
            connection,
            connections: self.clone(),
        }
    }

    /// The open connections, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<ConnectionView> {
        let mut open: Vec<(u64, Arc<LiveConnection>)> =
            self.lock().iter().map(|(id, c)| (*id, c.clone())).collect();
        open.sort_by_key(|(id, _)| *id);
        open.into_iter()
            .map(|(_, c)| ConnectionView::of(&c))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConnection>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in [`Connections`]; dropping it removes the connection.
#[derive(Debug)]
pub(crate) struct Listed {
    id: u64,
    pub(crate) connection: Arc<LiveConnection>,
    connections: Arc<Connections>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// Counts the bytes of one connection, for the connection itself and for Istio's byte metrics.
///
/// `sent` and `received` are from the local pod's side. The metrics are from the client's:
/// `istio_tcp_received_bytes_total` is what the client sent, whichever end reports it.
#[derive(Debug, Default)]
pub struct Meter {
    connection: Option<Arc<LiveConnection>>,
    sent_metric: Counter,
    received_metric: Counter,
}

impl Meter {
    pub(crate) fn new(
        connection: Arc<LiveConnection>,
        sent_metric: Counter,
        received_metric: Counter,
    ) -> Self {
        Self {
            connection: Some(connection),
            sent_metric,
            received_metric,
        }
    }

    /// The local pod sent `n` bytes.
    pub(crate) fn sent(&self, n: usize) {
        if let Some(connection) = &self.connection {
            connection.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.sent_metric.inc_by(n as u64);
    }

    /// The local pod received `n` bytes.
    pub(crate) fn received(&self, n: usize) {
        if let Some(connection) = &self.connection {
            connection.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.received_metric.inc_by(n as u64);
    }
}

/// The local pod's TCP connection, counting what crosses it.
#[derive(Debug)]
pub(crate) struct Metered<'a, S> {
    pub(crate) inner: S,
    pub(crate) meter: &'a Meter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.meter.sent(read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.meter.received(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An open connection as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// Where each end is, as Istio's metrics label it; `unknown` where not known.
    #[serde(default)]
    pub src_cluster: String,
    #[serde(default)]
    pub src_region: String,
    #[serde(default)]
    pub src_zone: String,
    #[serde(default)]
    pub dst_cluster: String,
    #[serde(default)]
    pub dst_region: String,
    #[serde(default)]
    pub dst_zone: String,
    /// Seconds since the Unix epoch.
    pub opened_at: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl ConnectionView {
    fn of(connection: &LiveConnection) -> Self {
        let endpoints = &connection.endpoints;
        let (bytes_sent, bytes_received) = connection.bytes();
        let [src, dst] = connection.series.labels().placements();
        Self {
            direction: endpoints.direction,
            src: endpoints.src,
            dst: endpoints.dst,
            src_identity: endpoints.src_identity.as_ref().map(ToString::to_string),
            dst_identity: endpoints.dst_identity.as_ref().map(ToString::to_string),
            src_workload: endpoints.src_workload.clone(),
            dst_workload: endpoints.dst_workload.clone(),
            src_cluster: src.cluster.to_owned(),
            src_region: src.region.to_owned(),
            src_zone: src.zone.to_owned(),
            dst_cluster: dst.cluster.to_owned(),
            dst_region: dst.region.to_owned(),
            dst_zone: dst.zone.to_owned(),
            opened_at: super::unix_seconds(connection.opened_at),
            bytes_sent,
            bytes_received,
        }
    }
}
