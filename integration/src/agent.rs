//! `ambit agent` as a child process in a node's namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ambit_agent::topology::Topology;

use crate::pod::InPod;

/// A running agent; killed when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    node: String,
    child: Child,
    log: PathBuf,
    node_ns: InPod,
}

impl AgentProcess {
    /// Starts the agent of `node` (namespace `netns`) on the cluster file `config`.
    pub fn start(node: &str, netns: &str, config: &Path, ca_dir: &Path, log: PathBuf) -> Self {
        let log_file = std::fs::File::create(&log).expect("create the agent's log");
        let child = Topology::command_in(netns, binary())
            .args(["agent", "--node", node, "--log-format", "json", "--config"])
            .arg(config)
            .arg("--ca-dir")
            .arg(ca_dir)
            .env(
                "AMBIT_LOG",
                std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start ambit agent");
        Self {
            node: node.to_owned(),
            child,
            log,
            node_ns: InPod::open(&Path::new("/var/run/netns").join(netns)),
        }
    }

    /// Waits until the agent reports ready; fails the test, with the agent's log, if it does not
    /// within a minute.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent of {} exited with {status}:\n{}",
                    self.node,
                    self.log()
                );
            }
            let ready = self
                .node_ns
                .run(|| probe_ready(SocketAddr::from(([127, 0, 0, 1], 15021))))
                .await;
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the agent of {} never became ready:\n{}",
            self.node,
            self.log()
        );
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
        ambit_agent::READY_PATH
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// The `ambit` binary built next to the running test (`AMBIT_BIN` overrides it).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AMBIT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("the test runs from a cargo target directory");
    let binary = profile_dir.join("ambit");
    assert!(
        binary.exists(),
        "{} is missing: build it first (`cargo build -p ambit-agent`), or set AMBIT_BIN",
        binary.display()
    );
    binary
}
