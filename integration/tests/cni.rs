//! `ambit-cni` with the agent down: ADD asks the fake API server whether the pod is in the
//! mesh and lets only pods outside it start. Needs no root.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

const OBJECTS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node1, containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy}
spec: {nodeName: node1, containers: [{name: c, image: i}]}
";

/// A fake API server process, killed when dropped.
struct FakeServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl FakeServer {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temporary directory")?;
        fs::write(dir.path().join("objects.yaml"), OBJECTS)?;
        let log = File::create(dir.path().join("server.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
            .arg("--objects")
            .arg(dir.path().join("objects.yaml"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(dir.path().join("kubeconfig"))
            .stderr(log)
            .spawn()
            .context("starting fake-apiserver")?;
        let mut server = Self { child, dir };
        server.wait_ready()?;
        Ok(server)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Waits for the kubeconfig, which the server writes once it listens.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = fs::read_to_string(self.dir.path().join("server.log"))?;
                bail!("the fake API server exited with {status}:\n{log}");
            }
            if self.kubeconfig().exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the fake API server did not write its kubeconfig")
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prev_result() -> Value {
    json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.7/24", "interface": 0}]})
}

/// Runs ADD for `namespace/name` with no agent listening; returns the exit code and stdout.
fn add(kubeconfig: &Path, namespace: &str, name: &str) -> anyhow::Result<(i32, Value)> {
    let plugin = ambit_integration::cni_binary();
    ensure!(
        plugin.exists(),
        "{} is missing: build it first (cargo build -p ambit-cni) or set AMBIT_CNI_BIN",
        plugin.display()
    );
    let dir = tempfile::tempdir()?;
    let netconf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "agentSocket": dir.path().join("no-agent.sock"),
        "timeoutSeconds": 10,
        "kubeconfig": kubeconfig,
        "prevResult": prev_result(),
    });
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/cni-42")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=u"
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("the plugin's stdin")?
        .write_all(netconf.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    let stdout: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((
        output.status.code().context("the plugin was killed")?,
        stdout,
    ))
}

#[test]
fn a_pod_in_the_mesh_waits_for_the_agent() -> anyhow::Result<()> {
    let server = FakeServer::start()?;
    let (code, error) = add(&server.kubeconfig(), "shop", "client")?;
    assert_eq!((code, &error["code"]), (1, &json!(11)), "{error}");
    let details = error["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("is in the mesh according to the API server"),
        "{details}"
    );
    Ok(())
}

#[test]
fn pods_outside_the_mesh_start_without_the_agent() -> anyhow::Result<()> {
    let server = FakeServer::start()?;
    for (namespace, name) in [("legacy", "outsider"), ("shop", "opted-out")] {
        let (code, result) = add(&server.kubeconfig(), namespace, name)?;
        assert_eq!((code, &result), (0, &prev_result()), "{namespace}/{name}");
    }
    Ok(())
}

#[test]
fn a_pod_the_api_server_does_not_know_waits_for_the_agent() -> anyhow::Result<()> {
    let server = FakeServer::start()?;
    let (code, error) = add(&server.kubeconfig(), "shop", "ghost")?;
    assert_eq!((code, &error["code"]), (1, &json!(11)), "{error}");
    let details = error["details"].as_str().unwrap_or_default();
    assert!(details.contains("404"), "{details}");
    Ok(())
}

#[test]
fn an_unreachable_api_server_fails_closed() -> anyhow::Result<()> {
    let server = FakeServer::start()?;
    let kubeconfig = server.kubeconfig();
    let text = fs::read_to_string(&kubeconfig)?;
    let unreachable = server.dir.path().join("unreachable-kubeconfig");
    // Port 1 on loopback: nobody listens, the connection is refused at once.
    let port_start = text
        .find("server: https://127.0.0.1:")
        .context("the server line")?
        + 26;
    let port_end = port_start
        + text[port_start..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(0);
    fs::write(
        &unreachable,
        format!("{}1{}", &text[..port_start], &text[port_end..]),
    )?;
    let (code, error) = add(&unreachable, "legacy", "outsider")?;
    assert_eq!((code, &error["code"]), (1, &json!(11)), "{error}");
    Ok(())
}
