use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::MetricsEndpoint;
use crate::telemetry::{Metrics, Telemetry};

/// A collector that waits, while it encodes, for the test to release it.
#[derive(Debug)]
struct WaitsForRelease {
    released: Mutex<Receiver<()>>,
    timed_out: Arc<AtomicBool>,
}

impl Collector for WaitsForRelease {
    fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let released = self.released.lock().unwrap();
        if released.recv_timeout(Duration::from_secs(10)).is_err() {
            self.timed_out.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[test]
fn a_scrape_leaves_the_async_worker_free() {
    let (release, released) = channel();
    let timed_out = Arc::new(AtomicBool::new(false));
    let mut metrics = Metrics::new();
    metrics
        .ambit_registry()
        .register_collector(Box::new(WaitsForRelease {
            released: Mutex::new(released),
            timed_out: timed_out.clone(),
        }));
    let telemetry = Telemetry::new(metrics, Duration::MAX, "Kubernetes".to_owned());
    let endpoint = MetricsEndpoint::new(Arc::new(telemetry));
    // One thread: a scrape encoded on it would keep the releasing task from running.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let text = runtime.block_on(async {
        let releasing = async {
            tokio::task::yield_now().await;
            release.send(()).unwrap();
        };
        tokio::join!(endpoint.encode(), releasing).0
    });
    assert!(
        !timed_out.load(Ordering::Relaxed),
        "the scrape held the worker"
    );
    assert!(text.unwrap().contains("istio_tcp_sockets_open"));
}
