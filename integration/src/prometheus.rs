//! A real Prometheus (the system's `prometheus`, Debian's package) scraping the lab's agents,
//! and its query API, for tests that check what the consumers of ambit's metrics see.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ambit_agent::lab::topology::Topology;
use ambit_agent::lab::{Cluster, InPod};
use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// Where Prometheus listens, in the namespace of the node it runs on.
const LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 19090);
const METRICS_PORT: u16 = 15020;
/// Scraping every second lets a test see rates a few seconds after its traffic.
const SCRAPE_INTERVAL: &str = "1s";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Prometheus scraping every agent of a cluster; killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    node_ns: InPod,
    log: std::path::PathBuf,
    /// The scrape targets, `node-ip:15020`.
    targets: Vec<String>,
    _dir: tempfile::TempDir,
}

/// One series of a query's result: its labels and its value at the evaluation time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<VectorSample>),
    Scalar((f64, String)),
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Prometheus {
    /// Starts Prometheus in the namespace of `node`, scraping the metrics port of every node's
    /// agent each second, then waits until it answers. Each target carries the labels that
    /// Istio's scrape configuration copies from the pod, as those of the chart installed for
    /// Istio's dashboards and Kiali (release `ztunnel`, `podLabels.app=ztunnel`): `namespace`,
    /// `pod` (`ztunnel-ambit-<node>`) and `app`.
    pub async fn start(cluster: &Cluster, node: &str) -> anyhow::Result<Self> {
        let nodes = cluster.topology().nodes();
        let netns = &nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node}"))?
            .netns;
        let dir = tempfile::tempdir().context("creating Prometheus's directory")?;
        let mut config = format!(
            "global: {{scrape_interval: {SCRAPE_INTERVAL}, evaluation_interval: {SCRAPE_INTERVAL}}}\nscrape_configs:\n- job_name: ambit\n  static_configs:\n"
        );
        let mut targets = Vec::new();
        for node in nodes {
            let target = format!("{}:{METRICS_PORT}", node.ip);
            let _ = write!(
                config,
                "  - targets: ['{target}']\n    labels: {{namespace: istio-system, pod: ztunnel-ambit-{name}, app: ztunnel}}\n",
                name = node.name,
            );
            targets.push(target);
        }
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).context("writing Prometheus's configuration")?;
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).context("creating Prometheus's log")?;
        let child = Topology::command_in(netns, "prometheus")
            .arg(flag("config.file", &config_file))
            .arg(flag("storage.tsdb.path", &dir.path().join("data")))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting prometheus (Debian's package `prometheus`)")?;
        let mut prometheus = Self {
            child,
            node_ns: InPod::open(&Path::new("/var/run/netns").join(netns))?,
            log,
            targets,
            _dir: dir,
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("prometheus exited with {status}:\n{}", self.log());
            }
            if matches!(self.get("/-/ready").await, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("prometheus never became ready:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every agent has been scraped successfully.
    pub async fn wait_scraped(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let up = self.query("up == 1").await?;
            let scraped =
                |target: &String| up.iter().any(|s| s.labels.get("instance") == Some(target));
            if self.targets.iter().all(scraped) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus did not scrape {:?}: up is {up:?}\n{}",
                    self.targets,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Evaluates the instant query `query` now; a scalar result is one sample without labels.
    pub async fn query(&self, query: &str) -> anyhow::Result<Vec<Sample>> {
        let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let (status, body) = self.get(&format!("/api/v1/query?query={encoded}")).await?;
        let response: Response = serde_json::from_slice(&body)
            .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))?;
        if response.status != "success" {
            bail!(
                "{query}: {}",
                response.error.unwrap_or_else(|| response.status.clone())
            );
        }
        let value = |v: &str| v.parse::<f64>().with_context(|| format!("value {v}"));
        match response.data {
            Some(Data::Vector(samples)) => samples
                .into_iter()
                .map(|s| {
                    Ok(Sample {
                        value: value(&s.value.1)?,
                        labels: s.metric,
                    })
                })
                .collect(),
            Some(Data::Scalar((_, v))) => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value(&v)?,
            }]),
            None => bail!("{query}: no data"),
        }
    }

    /// `GET path` from Prometheus, in its node's namespace: the status and the body.
    async fn get(&self, path: &str) -> anyhow::Result<(u16, bytes::Bytes)> {
        let stream = self.node_ns.connect(LISTEN).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, LISTEN.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .context("prometheus did not answer")??;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn flag(name: &str, path: &Path) -> std::ffi::OsString {
    let mut flag = std::ffi::OsString::from(format!("--{name}="));
    flag.push(path);
    flag
}
