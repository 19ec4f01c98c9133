//! `ambit agent` as a child process in a node's namespace.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::pod::InPod;
use super::topology::Topology;

const READINESS_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15020;

/// How long an agent may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent; killed when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    node: String,
    child: Child,
    log: PathBuf,
    node_ns: InPod,
    netns: String,
    binary: PathBuf,
}

impl AgentProcess {
    /// Starts `binary agent` for `node` in its namespace `netns`, reading the cluster from
    /// `source` (`--config FILE`, or `--source kubernetes ...`), getting certificates as `ca`
    /// says (`--ca-dir DIR`, or `--ca-addr ...`), with `extra_args`; its JSON log, at level
    /// `info` so that it holds the access log, goes to `log`.
    pub fn start(
        binary: &Path,
        node: &str,
        netns: &str,
        source: &[OsString],
        ca: &[OsString],
        extra_args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Topology::command_in(netns, binary)
            .args(["agent", "--node", node, "--log-format", "json"])
            .args(source)
            .args(ca)
            .args(extra_args)
            .env("AMBIT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} agent", binary.display()))?;
        Ok(Self {
            node: node.to_owned(),
            child,
            log,
            node_ns: InPod::open(&Path::new("/var/run/netns").join(netns))?,
            netns: netns.to_owned(),
            binary: binary.to_owned(),
        })
    }

    /// Whether the agent reports ready now.
    pub async fn is_ready(&self) -> anyhow::Result<bool> {
        let ready = self.get(READINESS_PORT, crate::READY_PATH).await?;
        Ok(ready.is_some_and(|(status, _)| status == 200))
    }

    /// Waits until the agent reports ready on its readiness port.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the agent of {} exited with {status}:\n{}",
                    self.node,
                    self.log()
                );
            }
            if self.is_ready().await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the agent of {} never became ready:\n{}",
            self.node,
            self.log()
        )
    }

    /// `GET path` on the agent's `port` on the node's loopback: the status and body, or `None`
    /// when nothing answers.
    pub async fn get(&self, port: u16, path: &str) -> anyhow::Result<Option<(u16, String)>> {
        self.get_from(SocketAddr::from(([127, 0, 0, 1], port)), path)
            .await
    }

    /// `GET path` on `addr`, from the agent's node.
    pub async fn get_from(
        &self,
        addr: SocketAddr,
        path: &str,
    ) -> anyhow::Result<Option<(u16, String)>> {
        let path = path.to_owned();
        Ok(self.node_ns.run(move || http_get(addr, &path)).await?)
    }

    /// The text of the agent's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        match self.get(METRICS_PORT, "/metrics").await? {
            Some((200, body)) => Ok(body),
            other => bail!("the agent of {} served no metrics: {other:?}", self.node),
        }
    }

    /// Runs `ambit debug ARGS` in the node's namespace, as an operator on the node would.
    pub fn debug(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Topology::command_in(&self.netns, &self.binary)
            .arg("debug")
            .args(args)
            .output()
            .with_context(|| format!("running ambit debug {}", args.join(" ")))
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent at once, as a crash would.
    pub fn kill(mut self) {
        self.stop();
    }

    /// Asks the agent to stop (SIGTERM), as kubelet does, without waiting.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling the agent of {}", self.node))
    }

    /// Whether the agent has exited, waiting up to `limit` for it.
    pub async fn exited_within(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request that asks the server to close, so that the body ends with the stream.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}
