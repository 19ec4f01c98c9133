//! Agents that hold no CA key: they get their workload certificates from `ambit ca` by CSR,
//! authenticated by their node's token, and the mesh works as with a CA key on every node;
//! short-lived certificates renewed under load, and a root rotated, break no connection.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambit_agent::lab::{Cluster, ClusterBuilder, EchoApp, InPod, read_peer_line};
use ambit_identity::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, LocalCa, ROOT_CERT_FILE, TrustDomain,
};
use ambit_integration::{ALLOW_CLIENT, STRICT_SHOP, two_teams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;

/// [`two_teams`], read from an API server, with `ambit ca` signing the agents' certificates;
/// plaintext into `shop` is refused, so every connection that works there was tunneled.
fn with_certificate_authority() -> ClusterBuilder {
    two_teams()
        .kubernetes(Path::new(env!("CARGO_BIN_EXE_fake-apiserver")))
        .certificate_authority()
        .objects(&format!("{STRICT_SHOP}{ALLOW_CLIENT}"))
}

/// Connects, reads the echo app's greeting and has one line echoed.
async fn exchange(from: &InPod, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = from.connect(to).await?;
    read_peer_line(&mut stream).await?;
    ping(&mut stream).await?;
    Ok(stream)
}

async fn ping(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"ping\n").await?;
    let mut echoed = [0; 5];
    stream.read_exact(&mut echoed).await?;
    Ok(())
}

/// Whether a connection from `from` to `to` works within 5 s.
async fn connects(cluster: &Cluster, from: &str, to: &str) -> bool {
    let from = cluster.in_pod(from).unwrap();
    let to = cluster.addr(to, APP_PORT).unwrap();
    tokio::time::timeout(Duration::from_secs(5), exchange(&from, to))
        .await
        .is_ok_and(|stream| stream.is_ok())
}

/// The value of the first sample of `metrics` whose line starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn issued(cluster: &Cluster, node: &str) -> f64 {
    let metrics = cluster.agent(node).unwrap().metrics().await.unwrap();
    sample(
        &metrics,
        r#"ambit_certificate_requests_total{outcome="issued"}"#,
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_ca_key_tunnel_and_police_as_before() {
    let cluster = with_certificate_authority().start().await.unwrap();
    let _server = cluster
        .in_pod("server")
        .unwrap()
        .echo(APP_PORT)
        .await
        .unwrap();

    assert!(
        connects(&cluster, "client", "server").await,
        "client could not reach server\n{}",
        cluster.logs()
    );
    assert!(
        !connects(&cluster, "admin", "server").await,
        "admin reached server despite the policy"
    );
    for node in ["node1", "node2"] {
        let agent = cluster.agent(node).unwrap();
        let (_, dump) = agent.get(15000, "/config_dump").await.unwrap().unwrap();
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let config = &dump["config"];
        assert!(
            config["ca_dir"].is_null()
                && config["ca_addr"]
                    .as_str()
                    .is_some_and(|addr| addr.starts_with("https://")),
            "the agent of {node} does not use the CA: {config}"
        );
        assert!(issued(&cluster, node).await >= 1.0, "{}", cluster.logs());
    }
}

/// The CA directory in the layout of a mounted Secret: each file a link through `..data` to
/// a directory of one version, so that a new version replaces them all at once.
struct MountedSecret {
    dir: PathBuf,
    versions: u32,
}

impl MountedSecret {
    /// Turns the files of `dir` into such links, same content.
    fn adopt(dir: &Path) -> Self {
        let mut secret = Self {
            dir: dir.to_owned(),
            versions: 0,
        };
        let files = secret.read();
        secret.publish(&files);
        secret
    }

    fn read(&self) -> Vec<(&'static str, String)> {
        [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE]
            .into_iter()
            .map(|file| (file, std::fs::read_to_string(self.dir.join(file)).unwrap()))
            .collect()
    }

    /// Publishes a new version of the files, as the kubelet does when a Secret changes.
    fn publish(&mut self, files: &[(&'static str, String)]) {
        self.versions += 1;
        let version = format!("..version{}", self.versions);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        for (file, content) in files {
            std::fs::write(self.dir.join(&version).join(file), content).unwrap();
        }
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.dir.join("..data")).unwrap();
        for (file, _) in files {
            let link = self.dir.join(format!("{file}.link"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link).unwrap();
            std::fs::rename(&link, self.dir.join(file)).unwrap();
        }
    }
}

/// Connections made and failed by the traffic of the rotation test.
#[derive(Debug, Default)]
struct Tally {
    opened: AtomicU64,
    failed: AtomicU64,
    pings: AtomicU64,
}

/// Opens a connection from `from` to `to` every 100 ms until `until`, each checked with one
/// exchange.
async fn new_connections(from: InPod, to: std::net::SocketAddr, until: Instant, tally: Arc<Tally>) {
    while Instant::now() < until {
        let attempt = tokio::time::timeout(Duration::from_secs(5), exchange(&from, to)).await;
        match attempt {
            Ok(Ok(_)) => tally.opened.fetch_add(1, Ordering::Relaxed),
            _ => tally.failed.fetch_add(1, Ordering::Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Holds one connection from `from` to `to` until `until`, exchanging a line every 500 ms;
/// counts a failure if it breaks.
async fn long_lived(from: InPod, to: std::net::SocketAddr, until: Instant, tally: Arc<Tally>) {
    let Ok(mut stream) = exchange(&from, to).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    while Instant::now() < until {
        let pinged = tokio::time::timeout(Duration::from_secs(5), ping(&mut stream)).await;
        if !matches!(pinged, Ok(Ok(()))) {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.pings.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// 60 s certificates renewed at half-life for 3 minutes of traffic, and a root rotation in
/// the middle (the new root trusted, then signing, then the old one removed, a certificate
/// lifetime apart): not one new or long-lived connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_a_root_rotation_break_no_connection() {
    const LIFETIME: Duration = Duration::from_secs(60);
    let cluster = with_certificate_authority()
        .agent_args(&["--certificate-ttl", "60s"])
        .start()
        .await
        .unwrap();
    let _server: EchoApp = cluster
        .in_pod("server")
        .unwrap()
        .echo(APP_PORT)
        .await
        .unwrap();
    let server = cluster.addr("server", APP_PORT).unwrap();
    let issued_before = issued(&cluster, "node1").await + issued(&cluster, "node2").await;

    let start = Instant::now();
    let until = start + 3 * LIFETIME;
    let tally = Arc::new(Tally::default());
    let mut traffic = Vec::new();
    for _ in 0..4 {
        let from = cluster.in_pod("client").unwrap();
        traffic.push(tokio::spawn(long_lived(from, server, until, tally.clone())));
    }
    let from = cluster.in_pod("client").unwrap();
    traffic.push(tokio::spawn(new_connections(
        from,
        server,
        until,
        tally.clone(),
    )));

    let mut secret = MountedSecret::adopt(cluster.ca_dir());
    let old = secret.read();
    let root = |files: &[(&str, String)]| files[2].1.clone();
    let new_dir = tempfile::tempdir().unwrap();
    let trust_domain: TrustDomain = "cluster.local".parse().unwrap();
    LocalCa::load_or_create(new_dir.path(), &trust_domain).unwrap();
    let new = MountedSecret {
        dir: new_dir.path().to_owned(),
        versions: 0,
    }
    .read();
    let both_roots = format!("{}{}", root(&old), root(&new));

    // 1. Every workload learns to trust the new root.
    tokio::time::sleep_until((start + LIFETIME / 2).into()).await;
    let mut trusting = old.clone();
    trusting[2].1 = both_roots.clone();
    secret.publish(&trusting);
    // 2. A lifetime later, the new CA signs.
    tokio::time::sleep_until((start + LIFETIME * 3 / 2).into()).await;
    let mut signing = new.clone();
    signing[2].1 = both_roots;
    secret.publish(&signing);
    // 3. A lifetime later, the old root goes.
    tokio::time::sleep_until((start + LIFETIME * 5 / 2).into()).await;
    secret.publish(&new);

    for task in traffic {
        task.await.unwrap();
    }
    let opened = tally.opened.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} connections failed, {opened} opened\n{}",
        cluster.logs()
    );
    assert!(opened > 500, "only {opened} connections opened");
    assert!(tally.pings.load(Ordering::Relaxed) > 1000);

    // Two identities (client and server) renewed every half-life for three lifetimes.
    let issued_after = issued(&cluster, "node1").await + issued(&cluster, "node2").await;
    assert!(
        issued_after - issued_before >= 8.0,
        "{issued_before} certificates issued before, {issued_after} after"
    );
    // And the certificates now in use chain to the new root alone.
    assert!(
        connects(&cluster, "client", "server").await,
        "{}",
        cluster.logs()
    );
}
