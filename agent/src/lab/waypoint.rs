//! `ambit waypoint` as a child process in a pod's namespace, outside capture, as a waypoint's
//! Deployment runs it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::topology::Topology;

/// What the waypoint logs once it serves.
const SERVING: &str = "waypoint serving";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running waypoint; killed when dropped.
#[derive(Debug)]
pub struct WaypointProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl WaypointProcess {
    /// Starts `binary waypoint` as the waypoint `namespace/name` (its pods' service account is
    /// `name`) in the pod namespace `netns`, reading the cluster from `source` with certificates
    /// from the CA in `ca_dir`; its JSON log goes to `log`. Returns once it serves.
    pub(crate) async fn start(
        binary: &Path,
        netns: &str,
        (namespace, name): (&str, &str),
        source: &[OsString],
        ca_dir: &Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Topology::command_in(netns, binary)
            .args(["waypoint", "--name", name, "--namespace", namespace])
            .args(["--service-account", name, "--log-format", "json"])
            .args(source)
            .arg("--ca-dir")
            .arg(ca_dir)
            .env("AMBIT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting the waypoint {namespace}/{name}"))?;
        let mut waypoint = Self {
            name: format!("{namespace}/{name}"),
            child,
            log,
        };
        waypoint.wait_serving().await?;
        Ok(waypoint)
    }

    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the waypoint {} exited with {status}:\n{}",
                    self.name,
                    self.log()
                );
            }
            if self.log().contains(SERVING) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the waypoint {} never served:\n{}", self.name, self.log())
    }

    /// What the waypoint logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WaypointProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
