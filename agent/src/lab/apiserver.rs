//! The `fake-apiserver` of the integration crate as a child process, serving the cluster file
//! to agents that run `--source kubernetes`. It runs in the caller's namespace, joined to the
//! underlay, so that tests reach it as the nodes do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long the server may take to write its kubeconfig.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What the server logs each time it has loaded the objects file.
const LOADED: &str = "objects file loaded";
/// The port it listens on.
const PORT: u16 = 6443;

/// A running fake API server; killed when dropped.
#[derive(Debug)]
pub(super) struct ApiServerProcess {
    /// `None` while stopped.
    child: Option<Child>,
    binary: PathBuf,
    /// More flags, such as `--watch-delay-ms`.
    args: Vec<String>,
    listen: String,
    objects: PathBuf,
    kubeconfig: PathBuf,
    log: PathBuf,
}

impl ApiServerProcess {
    /// Starts `binary` on `address`, which every node reaches, serving `objects`; returns once
    /// its kubeconfig is written.
    pub(super) async fn start(
        binary: &Path,
        args: &[String],
        address: std::net::Ipv4Addr,
        objects: &Path,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut server = Self {
            child: None,
            binary: binary.to_owned(),
            args: args.to_vec(),
            listen: format!("{address}:{PORT}"),
            objects: objects.to_owned(),
            kubeconfig: dir.join("kubeconfig"),
            log: dir.join("apiserver.log"),
        };
        server.restart().await?;
        Ok(server)
    }

    pub(super) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Stops the server at once, if it runs, and starts it again with the same certificate and
    /// token, as when an API server restarts: it remembers no version its clients saw.
    pub(super) async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        // Dies with the thread that started it, as the agents do.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.binary)
            .arg("--objects")
            .arg(&self.objects)
            .args(["--listen", &self.listen])
            .arg("--kubeconfig-out")
            .arg(&self.kubeconfig)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.kubeconfig.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                bail!("the API server exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("the API server never wrote its kubeconfig:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// How many times the server has loaded the objects file so far.
    pub(super) fn loads(&self) -> usize {
        self.log().matches(LOADED).count()
    }

    /// The resource version of the server's latest load of the objects file, once it has
    /// loaded it more than `before` times.
    pub(super) async fn loaded_after(
        &self,
        before: usize,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(LOADED).count() > before
                && let Some(version) = log
                    .lines()
                    .filter(|line| line.contains(LOADED))
                    .filter_map(resource_version)
                    .next_back()
            {
                return Ok(version);
            }
            if Instant::now() > deadline {
                bail!("the API server did not load the objects file:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(super) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ApiServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `resource_version` field of a log line, JSON or text, quoted or not.
pub(super) fn resource_version(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("resource_version")?;
    let digits: String = rest
        .trim_start_matches(['"', ':', '=', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
