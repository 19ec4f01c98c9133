use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::sleep;

use super::{SeriesIndex, Workloads, remove_departed};
use crate::drain;
use crate::state::{ClusterState, Locality, Protocol, Workload, WorkloadUid};
use crate::telemetry::metrics::TrafficMetrics;
use crate::telemetry::{Reporter, ResponseFlags, Telemetry, TrafficLabels};

const GRACE: Duration = Duration::from_secs(300);

/// A pod of the Deployment `name` in `shop`, at the `index`th address.
fn workload(name: &str, index: usize) -> Workload {
    Workload {
        uid: WorkloadUid(format!("uid-{name}")),
        name: format!("{name}-5d8f9c-abcde"),
        workload_name: name.to_owned(),
        namespace: "shop".into(),
        service_account: name.to_owned(),
        node: "node1".into(),
        ips: vec![format!("10.0.0.{}", index + 1).parse().unwrap()],
        labels: [("app".to_owned(), name.to_owned())].into(),
        protocol: Protocol::Hbone,
        locality: Locality::default(),
        waypoint: None,
    }
}

fn state(names: &[&str]) -> Arc<ClusterState> {
    let workloads = names.iter().enumerate().map(|(i, n)| workload(n, i));
    Arc::new(ClusterState::new(workloads, []))
}

fn labels(source: Option<&str>, destination: &str) -> TrafficLabels {
    TrafficLabels::new(
        Reporter::Source,
        "Kubernetes",
        (source.map(|s| workload(s, 0)).as_ref(), None),
        (Some(&workload(destination, 1)), None),
        None,
    )
}

fn has_source(text: &str, name: &str) -> bool {
    text.contains(&format!("source_workload=\"{name}\""))
}

#[tokio::test(start_paused = true)]
async fn series_of_workloads_gone_for_the_grace_are_removed() {
    let telemetry = Arc::new(Telemetry::default());
    let metrics = &telemetry.metrics;
    let everyone = ["frontend", "backend", "jobs", "db", "batch", "queue"];
    let (states, states_rx) = watch::channel(state(&everyone));
    // Closed connections: only the index holds their labels.
    let frontend = metrics.opened(labels(Some("frontend"), "backend"));
    let denied = frontend.labels().with_flags(ResponseFlags::Deny);
    metrics.traffic.closed.get_or_create(&denied).inc();
    metrics.traffic.failed.get_or_create(&denied).inc();
    metrics
        .traffic
        .sent
        .get_or_create(frontend.labels())
        .inc_by(10);
    drop(frontend);
    drop(metrics.opened(labels(Some("jobs"), "db")));
    drop(metrics.opened(labels(None, "db")));
    // A connection still open.
    let batch = metrics.opened(labels(Some("batch"), "queue"));
    let (_trigger, watcher) = drain::channel();
    tokio::spawn(remove_departed(
        telemetry.clone(),
        states_rx,
        GRACE,
        watcher,
    ));

    // frontend, jobs and batch leave; jobs comes back within the grace.
    states.send_replace(state(&["backend", "db", "queue"]));
    sleep(GRACE / 2).await;
    assert!(
        has_source(&metrics.encode(), "frontend"),
        "within the grace"
    );
    states.send_replace(state(&["backend", "jobs", "db", "queue"]));
    sleep(GRACE * 3 / 4).await;

    let text = metrics.encode();
    assert!(!has_source(&text, "frontend"), "{text}");
    assert!(
        !text.contains("DENY"),
        "the refused series went too: {text}"
    );
    assert!(
        !text.contains("destination_workload=\"backend\""),
        "backend's only series were frontend's: {text}"
    );
    assert!(has_source(&text, "jobs"), "jobs came back: {text}");
    assert!(has_source(&text, "unknown"), "an unknown end never leaves");
    assert!(has_source(&text, "batch"), "its connection is open: {text}");

    drop(batch);
    sleep(GRACE / 4 + Duration::from_secs(1)).await;
    let text = metrics.encode();
    assert!(!has_source(&text, "batch"), "closed since: {text}");
    assert!(has_source(&text, "jobs"), "{text}");

    // A label set removed comes back with the workload, counting from zero.
    states.send_replace(state(&everyone));
    drop(metrics.opened(labels(Some("frontend"), "backend")));
    let text = metrics.encode();
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{") && has_source(l, "frontend"))
        .unwrap();
    assert!(opened.ends_with(" 1"), "{opened}");
}

#[test]
fn connections_under_one_label_set_count_into_one_series() {
    let metrics = crate::telemetry::Metrics::new();
    let refused = metrics.opened(labels(Some("frontend"), "backend"));
    let text = metrics.encode();
    assert!(
        !text.contains("istio_tcp_received_bytes_total{"),
        "no connection carried bytes yet: {text}"
    );
    let carrying = metrics.opened(labels(Some("frontend"), "backend"));
    assert!(Arc::ptr_eq(&refused, &carrying));
    carrying.carried(&metrics.traffic).client_bytes.inc_by(5);
    let other = metrics.opened(labels(Some("frontend"), "backend"));
    other.carried(&metrics.traffic).client_bytes.inc_by(7);

    let text = metrics.encode();
    let value = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().to_owned()
    };
    assert_eq!(value("istio_tcp_connections_opened_total{"), "3", "{text}");
    assert_eq!(value("istio_tcp_received_bytes_total{"), "12", "{text}");
}

#[test]
fn a_sweep_waiting_for_a_scrape_holds_up_new_label_sets_only() {
    let traffic = TrafficMetrics::default();
    let index = SeriesIndex::default();
    let jobs = index.open(labels(Some("jobs"), "db"), &traffic);
    drop(index.open(labels(Some("frontend"), "backend"), &traffic));
    let present = Workloads::of(&state(&["jobs", "db", "backend"]));
    let (traffic, index, present) = (&traffic, &index, &present);

    let (reopened, removed) = std::thread::scope(|threads| {
        // What a scrape does while it encodes a family: hold it. Dropped before the threads
        // are joined, also when an assertion fails.
        let scrape = traffic.opened.get_or_create(jobs.labels());
        let sweep = threads.spawn(move || {
            index.sweep(
                traffic,
                present,
                tokio::time::Instant::now(),
                Duration::ZERO,
            )
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The sweep has taken frontend's series out of the index; it waits for the family.
        while !index.sets.try_lock().is_ok_and(|sets| sets.len() == 1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the sweep holds the index while it waits for the family"
            );
            std::thread::yield_now();
        }
        let (opened, known) = std::sync::mpsc::channel();
        threads.spawn(move || opened.send(index.open(labels(Some("jobs"), "db"), traffic)));
        let known = known.recv_timeout(Duration::from_secs(10));
        assert!(
            known.is_ok_and(|known| Arc::ptr_eq(&known, &jobs)),
            "a connection under known labels waited for the sweep"
        );
        // A label set being removed comes back only once it is gone from the family.
        let reopened =
            threads.spawn(move || index.open(labels(Some("frontend"), "backend"), traffic));
        drop(scrape);
        (reopened.join().unwrap(), sweep.join().unwrap())
    });
    assert_eq!(removed, 1);
    assert_eq!(reopened.opened.get(), 1);
    assert_eq!(traffic.opened.get_or_create(reopened.labels()).get(), 1);
}
