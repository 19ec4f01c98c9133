//! `GET /healthz/ready` on :15021: ready once the source has synced and every enrolled pod is
//! captured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::accept::serve_listener;
use crate::drain::DrainWatcher;

/// The path kubelet probes.
pub const READY_PATH: &str = "/healthz/ready";

/// Whether the agent is ready; shared by what decides it and what reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub(crate) async fn serve(self, listener: TcpListener, drain: DrainWatcher) {
        serve_listener(listener, drain, "readiness", move |tcp, _| {
            answer(tcp, self.0.load(Ordering::Relaxed))
        })
        .await;
    }
}

async fn answer(mut tcp: TcpStream, ready: bool) {
    let mut request = [0; 1024];
    let Ok(n) = tcp.read(&mut request).await else {
        return;
    };
    let request = String::from_utf8_lossy(&request[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    let (status, body) = match (path == READY_PATH, ready) {
        (true, true) => ("200 OK", "ready\n"),
        (true, false) => ("503 Service Unavailable", "not ready\n"),
        (false, _) => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
}
