//! `GET /healthz/ready` on :15021: ready once the source has synced and every enrolled pod is
//! captured.

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
pub(crate) struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

impl Handler for Readiness {
    async fn handle(&self, request: Request<Incoming>, _: SocketAddr) -> Response<Body> {
        match (
            request.uri().path() == READY_PATH,
            self.0.load(Ordering::Relaxed),
        ) {
            (true, true) => text(StatusCode::OK, "ready\n"),
            (true, false) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (false, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}
