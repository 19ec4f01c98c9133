//! The agent's CPU per Prometheus scrape on a busy node: 200 enrolled pods (a certificate each)
//! and 2,000 Istio series (each pod reached by 10 workloads), against the same node with 20
//! series. The goal is under 10 ms per scrape. Then what a new connection costs the metrics on
//! that node: its labels built and its series found.
//!
//! `cargo bench -p ambit-agent --bench metrics`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_agent::state::{Locality, Protocol, Workload, WorkloadUid};
use ambit_agent::telemetry::{Metrics, Reporter, TrafficLabels};
use ambit_agent::{ClientSettings, HboneClient};
use ambit_identity::Identity;
use ambit_redirect::Nftables;
use ambit_test_support::TestPki;
use ambit_test_support::measure::percentile_us;
use nix::time::{ClockId, clock_gettime};

const PODS: usize = 200;
const SOURCES_PER_POD: usize = 10;
const SCRAPES: usize = 200;

fn workload(namespace: &str, name: &str) -> Workload {
    Workload {
        uid: WorkloadUid(format!("{namespace}-{name}")),
        name: format!("{name}-7d9f8c6b5-x2x4q"),
        workload_name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        node: "node1".to_owned(),
        ips: vec!["10.244.1.10".parse().unwrap()],
        labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
        protocol: Protocol::Hbone,
        locality: Locality::default(),
        waypoint: None,
    }
}

/// A node's metrics with `pods` certificates and `pods * sources` Istio series.
async fn node(pki: &TestPki, pods: usize, sources: usize) -> Metrics {
    let certificates = pki.manager();
    let mut metrics = Metrics::new();
    for pod in 0..pods {
        let namespace = format!("team-{}", pod % 20);
        let destination = workload(&namespace, &format!("service-{pod}"));
        let identity = pki.identity(&namespace, &destination.service_account);
        certificates.fetch(&identity).await.unwrap();
        for source in 0..sources {
            let client = workload("clients", &format!("client-{source}"));
            let client_identity: Identity = pki.identity("clients", &client.service_account);
            let labels = TrafficLabels::new(
                Reporter::Destination,
                "Kubernetes",
                (Some(&client), Some(&client_identity)),
                (Some(&destination), Some(&identity)),
                None,
            );
            metrics.opened(labels);
        }
    }
    let client = HboneClient::new(certificates.clone(), ClientSettings::default());
    metrics.register_node(certificates, client, Arc::new(Nftables::default()));
    metrics
}

/// Thread CPU time of each of `SCRAPES` encodings, sorted, and the size of one.
fn scrape(metrics: &Metrics) -> (Vec<Duration>, usize) {
    let mut times = Vec::with_capacity(SCRAPES);
    let mut size = 0;
    for _ in 0..SCRAPES {
        let start = thread_cpu();
        size = std::hint::black_box(metrics.encode()).len();
        times.push(thread_cpu() - start);
    }
    times.sort_unstable();
    (times, size)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let pki = TestPki::new("cluster.local");
    let small = node(&pki, 2, SOURCES_PER_POD).await;
    let busy = node(&pki, PODS, SOURCES_PER_POD).await;
    let (small_times, small_size) = scrape(&small);
    let (busy_times, busy_size) = scrape(&busy);
    let series = |metrics: &Metrics| {
        metrics
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count()
    };
    println!(
        "CPU per /metrics scrape ({SCRAPES} scrapes each, one thread; goal: busy p99 < 10 ms)"
    );
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>10}",
        "node", "series", "bytes", "p50 ms", "p99 ms"
    );
    for (name, metrics, times, size) in [
        ("2 pods, 20 Istio series", &small, &small_times, small_size),
        (
            "200 pods, 2,000 Istio series",
            &busy,
            &busy_times,
            busy_size,
        ),
    ] {
        println!(
            "{name:<34} {:>10} {size:>12} {:>10.2} {:>10.2}",
            series(metrics),
            percentile_us(times, 0.5) / 1000.0,
            percentile_us(times, 0.99) / 1000.0,
        );
    }
    let ratio = percentile_us(&busy_times, 0.5) / percentile_us(&small_times, 0.5);
    println!("busy / small p50: {ratio:.1}x");
    let per_connection = open_connections(&pki, &busy);
    println!(
        "CPU per connection opened under known labels, 2,000 series: {:.0} ns",
        per_connection.as_nanos()
    );
}

/// Thread CPU per connection opened under the labels of one of the busy node's series, over
/// `CONNECTIONS` connections spread over all of them.
fn open_connections(pki: &TestPki, metrics: &Metrics) -> Duration {
    const CONNECTIONS: u32 = 200_000;
    let clients: Vec<(Workload, Identity)> = (0..SOURCES_PER_POD)
        .map(|source| {
            let client = workload("clients", &format!("client-{source}"));
            let identity = pki.identity("clients", &client.service_account);
            (client, identity)
        })
        .collect();
    let pods: Vec<(Workload, Identity)> = (0..PODS)
        .map(|pod| {
            let namespace = format!("team-{}", pod % 20);
            let destination = workload(&namespace, &format!("service-{pod}"));
            let identity = pki.identity(&namespace, &destination.service_account);
            (destination, identity)
        })
        .collect();
    let start = thread_cpu();
    for n in 0..CONNECTIONS as usize {
        let (client, client_identity) = &clients[n % SOURCES_PER_POD];
        let (pod, pod_identity) = &pods[n / SOURCES_PER_POD % PODS];
        let labels = TrafficLabels::new(
            Reporter::Destination,
            "Kubernetes",
            (Some(client), Some(client_identity)),
            (Some(pod), Some(pod_identity)),
            None,
        );
        std::hint::black_box(metrics.opened(labels));
    }
    (thread_cpu() - start) / CONNECTIONS
}

fn thread_cpu() -> Duration {
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap())
}
