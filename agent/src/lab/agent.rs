//! `ambit agent` as a child process in a node's namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::pod::InPod;
use super::topology::Topology;

/// How long an agent may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent; killed when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    node: String,
    child: Child,
    log: PathBuf,
    node_ns: InPod,
}

impl AgentProcess {
    /// Starts `binary agent` for `node` in its namespace `netns`, reading the cluster file
    /// `config`; its JSON log, at level `info` so that it holds the access log, goes to `log`.
    pub fn start(
        binary: &Path,
        node: &str,
        netns: &str,
        config: &Path,
        ca_dir: &Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Topology::command_in(netns, binary)
            .args(["agent", "--node", node, "--log-format", "json", "--config"])
            .arg(config)
            .arg("--ca-dir")
            .arg(ca_dir)
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
        })
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
            let probe = || probe_ready(SocketAddr::from(([127, 0, 0, 1], 15021)));
            if self.node_ns.run(probe).await? {
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

fn probe_ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: localhost\r\n\r\n",
        crate::READY_PATH
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}
