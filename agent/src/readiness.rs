//! `GET /healthz/ready` on :15021: ready once the source has synced and every enrolled pod is
//! captured, and not ready from the moment the agent starts draining or handing over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::http_server::{Body, Handler, text};

/// The path kubelet probes.
pub const READY_PATH: &str = "/healthz/ready";

/// Whether the agent is ready; shared by what decides it and what reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readiness {
    captured: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    handing_over: Arc<AtomicBool>,
}

impl Readiness {
    /// Whether every enrolled pod is captured.
    pub(crate) fn set(&self, captured: bool) {
        self.captured.store(captured, Ordering::Relaxed);
    }

    /// Not ready from now on, whatever `set` says.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Not ready while the agent hands its listeners over: the successor's readiness probe may
    /// reach this agent on the node's shared port, and must not see it ready.
    pub(crate) fn hand_over(&self, handing_over: bool) {
        self.handing_over.store(handing_over, Ordering::Relaxed);
    }

    fn ready(&self) -> bool {
        self.captured.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && !self.handing_over.load(Ordering::Relaxed)
    }
}

impl Handler for Readiness {
    async fn handle(&self, request: Request<Incoming>, _: SocketAddr) -> Response<Body> {
        match (request.uri().path() == READY_PATH, self.ready()) {
            (true, true) => text(StatusCode::OK, "ready\n"),
            (true, false) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (false, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}
