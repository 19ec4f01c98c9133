//! `fake-apiserver` and `ambit ca` as child processes on loopback, each logging to a file of
//! the API server's directory and killed when dropped.

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ambit_ca::client::{CaClient, CaClientConfig};
use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TestCa;
use crate::{agent_binary, fake_apiserver_binary};

/// How long either process may take to start listening, and `ambit ca` to exit when it should.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a starting or exiting process is checked on.
const POLL: Duration = Duration::from_millis(50);

/// `fake-apiserver` serving a cluster and reviewing tokens. Its directory holds its files and
/// those a test keeps with it (CA directories, the logs of the CAs), and goes when it is
/// dropped.
#[derive(Debug)]
pub struct ApiServerProcess {
    // Fields drop in order: the process ends before its directory goes.
    process: ChildProcess,
    dir: tempfile::TempDir,
}

impl ApiServerProcess {
    /// Starts the API server with `objects` (multi-document YAML) and the known `tokens`
    /// (`fake-apiserver --tokens`); returns once it listens.
    pub async fn start(objects: &str, tokens: &str) -> anyhow::Result<Self> {
        let binary = built(
            fake_apiserver_binary(),
            "ambit-integration",
            "AMBIT_FAKE_APISERVER_BIN",
        )?;
        let dir = tempfile::tempdir()?;
        let path = |name: &str| dir.path().join(name);
        fs::write(path("objects.yaml"), objects)?;
        fs::write(path("tokens.yaml"), tokens)?;
        let mut process = ChildProcess::spawn(
            Command::new(binary)
                .arg("--objects")
                .arg(path("objects.yaml"))
                .arg("--tokens")
                .arg(path("tokens.yaml"))
                .args(["--listen", "127.0.0.1:0"])
                .arg("--kubeconfig-out")
                .arg(path("kubeconfig")),
            "fake-apiserver",
            path("apiserver.log"),
        )?;
        // It writes its kubeconfig once it listens.
        let kubeconfig = path("kubeconfig");
        process
            .wait_until("write its kubeconfig", || {
                std::future::ready(kubeconfig.exists())
            })
            .await?;
        Ok(Self { process, dir })
    }

    /// `name` in the server's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The kubeconfig of a client of the server, with its token.
    pub fn kubeconfig(&self) -> PathBuf {
        self.path("kubeconfig")
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// `ambit ca` reviewing tokens and looking up pods with an [`ApiServerProcess`].
///
/// It trusts the node agents' account `ambit-system/ambit`, answers to `localhost` and
/// `127.0.0.1`, and issues for [`CaProcess::DEFAULT_TTL`] up to [`CaProcess::MAX_TTL`].
#[derive(Debug)]
pub struct CaProcess {
    process: ChildProcess,
    listen: SocketAddr,
    metrics: SocketAddr,
    /// The API server's directory, where the files of the agents' clients go.
    files: PathBuf,
}

impl CaProcess {
    /// The lifetime of a certificate whose request names none.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
    /// The longest lifetime the CA grants.
    pub const MAX_TTL: Duration = Duration::from_secs(2 * 3600);

    /// Starts `ambit ca` on `ca_dir` against `api`, with `flags` besides the usual ones, logging
    /// to `<name>.log` in the API server's directory; returns at once.
    pub fn spawn(
        api: &ApiServerProcess,
        name: &str,
        ca_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let binary = built(agent_binary(), "ambit-agent", "AMBIT_BIN")?;
        let (listen, metrics) = (free_port()?, free_port()?);
        let ttl = |ttl: Duration| format!("{}s", ttl.as_secs());
        let process = ChildProcess::spawn(
            Command::new(binary)
                .arg("ca")
                .args(["--listen", &listen.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .arg("--ca-dir")
                .arg(ca_dir)
                .arg("--kubeconfig")
                .arg(api.kubeconfig())
                .args(["--server-names", "localhost,127.0.0.1"])
                .args(["--default-ttl", &ttl(Self::DEFAULT_TTL)])
                .args(["--max-ttl", &ttl(Self::MAX_TTL)])
                .args(flags),
            "ambit ca",
            api.path(&format!("{name}.log")),
        )?;
        Ok(Self {
            process,
            listen,
            metrics,
            files: api.dir.path().to_owned(),
        })
    }

    /// [`spawn`](Self::spawn), then waits until it serves its metrics, which it binds with its
    /// service.
    pub async fn start(
        api: &ApiServerProcess,
        name: &str,
        ca_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut ca = Self::spawn(api, name, ca_dir, flags)?;
        let metrics = ca.metrics;
        ca.process
            .wait_until("listen", || async move {
                TcpStream::connect(metrics).await.is_ok()
            })
            .await?;
        Ok(ca)
    }

    /// Waits for the process to exit, failing if it does not within 20 s.
    pub async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.wait_exit().await
    }

    /// Where the certificate service listens (TLS for `localhost` and `127.0.0.1`).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The process id of `ambit ca`.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What `ambit ca` logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The agent's client of this CA: it sends `token` (a token of the tokens file) and
    /// trusts the root of `ca`, asking for `ttl`.
    pub fn agent_client(
        &self,
        token: &str,
        ca: &TestCa,
        ttl: Duration,
    ) -> anyhow::Result<CaClient> {
        Ok(CaClient::new(CaClientConfig {
            address: format!("https://{}", self.listen).parse()?,
            root_file: self.keep_file("root-", ca.root_pem())?,
            server_name: Some("localhost".to_owned()),
            token_file: self.keep_file("token-", &format!("{token}\n"))?,
            cluster_id: ambit_ca::DEFAULT_CLUSTER_ID.to_owned(),
            ttl,
        }))
    }

    /// `/metrics` of the CA.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// How many requests ended with the gRPC `code` (`OK`, `PermissionDenied`) and `reason`.
    pub async fn count(&self, code: &str, reason: &str) -> anyhow::Result<u64> {
        let series = format!("ambit_ca_requests_total{{code=\"{code}\",reason=\"{reason}\"}} ");
        self.metric(&series).await
    }

    /// The value of the series whose line starts with `series` (name, labels and a space); 0
    /// when absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<u64> {
        let metrics = self.scrape().await?;
        Ok(metrics
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .map_or(Ok(0), str::parse)?)
    }

    /// A new file holding `contents` among the API server's files, named `<prefix>...`.
    fn keep_file(&self, prefix: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let mut file = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(&self.files)?;
        file.write_all(contents.as_bytes())?;
        Ok(file.into_temp_path().keep()?)
    }
}

/// A child process logging to a file, killed when dropped.
#[derive(Debug)]
struct ChildProcess {
    child: Child,
    /// What the errors call it.
    name: &'static str,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `command`, its stderr into `log`, its stdout discarded.
    fn spawn(command: &mut Command, name: &'static str, log: PathBuf) -> anyhow::Result<Self> {
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { child, name, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Checks `ready` until it holds, failing if the process exits first or does not get
    /// there within [`START_TIMEOUT`]; `what` says what it should do.
    async fn wait_until<F: Future<Output = bool>>(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> F,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status}:\n{}", self.name, self.log());
            }
            if ready().await {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        bail!(
            "{} did not {what} within {} s:\n{}",
            self.name,
            START_TIMEOUT.as_secs(),
            self.log()
        )
    }

    /// Waits for the process to exit, failing if it does not within [`START_TIMEOUT`].
    async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(POLL).await;
        }
        bail!(
            "{} still runs after {} s:\n{}",
            self.name,
            START_TIMEOUT.as_secs(),
            self.log()
        )
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `binary`, if it was built; otherwise an error that says how to build it (`cargo build -p
/// <package>`) or name another with the environment `variable`.
fn built(binary: PathBuf, package: &str, variable: &str) -> anyhow::Result<PathBuf> {
    ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p {package}) or name it with {variable}",
        binary.display()
    );
    Ok(binary)
}

/// A loopback address with a port free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
