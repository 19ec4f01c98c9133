//! `ambit ca` as a child process beside the fake API server, so that agents get their
//! certificates as in a cluster: by CSR, authenticated with their node's token. Also the
//! tokens and agent pods the API server needs to vouch for them.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the CA serves its metrics, on the address it listens on.
const METRICS_PORT: u16 = 15014;
/// How long the CA may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The namespace and service account of the node agents, which the CA trusts to ask for the
/// identities of their nodes' pods.
const AGENT_NAMESPACE: &str = "ambit-system";
const AGENT_SERVICE_ACCOUNT: &str = "ambit";

/// A running `ambit ca`; killed when dropped.
#[derive(Debug)]
pub(super) struct CaProcess {
    child: Child,
    address: SocketAddr,
    /// Its `cacerts` directory; `root-cert.pem` there is also what agents authenticate it by.
    dir: PathBuf,
    log: PathBuf,
}

impl CaProcess {
    /// Starts `binary ca` on `address`, signing with the CA in `dir`, reviewing tokens with the
    /// API server of `kubeconfig`; returns once it accepts connections.
    pub(super) async fn start(
        binary: &Path,
        address: Ipv4Addr,
        kubeconfig: &Path,
        dir: &Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let listen = SocketAddr::from((address, ambit_ca::DEFAULT_PORT));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(binary)
            .args([
                "ca",
                "--log-format",
                "json",
                "--listen",
                &listen.to_string(),
            ])
            .args(["--metrics-addr", &format!("{address}:{METRICS_PORT}")])
            .arg("--ca-dir")
            .arg(dir)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--server-names", &address.to_string()])
            .args([
                "--trusted-node-accounts",
                &format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}"),
            ])
            .env("AMBIT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} ca", binary.display()))?;
        let mut ca = Self {
            child,
            address: listen,
            dir: dir.to_owned(),
            log,
        };
        ca.wait_listening().await?;
        Ok(ca)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the CA exited with {status}:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(self.address).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the CA never listened on {}:\n{}", self.address, self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The flags that make an agent ask this CA, authenticated by `token`.
    pub(super) fn agent_args(&self, token: &Path) -> Vec<OsString> {
        vec![
            "--ca-addr".into(),
            format!("https://{}", self.address).into(),
            "--ca-root".into(),
            self.dir.join(ambit_identity::ROOT_CERT_FILE).into(),
            "--ca-token".into(),
            token.into(),
        ]
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod of `node`'s agent, as its DaemonSet would create it: the pod its token is bound to.
pub(super) fn agent_pod(node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: ambit-{node}, namespace: {AGENT_NAMESPACE}, uid: {uid}}}\nspec: {{nodeName: {node}, serviceAccountName: {AGENT_SERVICE_ACCOUNT}, hostNetwork: true, containers: [{{name: agent, image: ambit}}]}}\nstatus: {{phase: Running}}\n",
        uid = agent_pod_uid(node),
    )
}

/// The token of `node`'s agent: a bound service-account token with the CA's audience.
pub(super) fn agent_token(node: &str) -> String {
    format!("agent-{node}-token")
}

/// The fake API server's tokens file entries for the agents of `nodes`.
pub(super) fn tokens_file(nodes: &[String]) -> String {
    let mut yaml = String::new();
    for node in nodes {
        let _ = write!(
            yaml,
            "- token: {token}\n  username: system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}\n  groups: [system:serviceaccounts, system:serviceaccounts:{AGENT_NAMESPACE}]\n  extra:\n    authentication.kubernetes.io/pod-name: [ambit-{node}]\n    authentication.kubernetes.io/pod-uid: [{uid}]\n  audiences: [{audience}]\n",
            token = agent_token(node),
            uid = agent_pod_uid(node),
            audience = ambit_ca::DEFAULT_AUDIENCE,
        );
    }
    yaml
}

fn agent_pod_uid(node: &str) -> String {
    format!("agent-pod-{node}")
}
