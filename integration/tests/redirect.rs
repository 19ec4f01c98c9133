//! Choosing the capture backend: `--redirect ebpf` where eBPF cannot run is refused with what is
//! missing; `--redirect auto` falls back to nftables and says why.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot run the agent fails the test"
)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use ambit_integration::agent_binary;

/// `ambit agent` as the unprivileged user `nobody`, without any capability, on ports of its own.
fn unprivileged_agent(dir: &std::path::Path, redirect: &str) -> Command {
    let config = dir.join("cluster.yaml");
    std::fs::write(
        &config,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    )
    .unwrap();
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(agent_binary())
        .args(["agent", "--node", "node1", "--redirect", redirect])
        .args([
            "--readiness-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.join("ca"));
    command
}

fn scratch_dir() -> tempfile::TempDir {
    assert!(
        nix::unistd::geteuid().is_root(),
        "dropping privileges needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

#[test]
fn ebpf_without_privileges_is_refused_saying_what_is_missing() {
    let dir = scratch_dir();
    let output = unprivileged_agent(dir.path(), "ebpf").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--redirect ebpf"), "{stderr}");
    assert!(stderr.contains("CAP_BPF and CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn auto_falls_back_to_nftables_and_says_why() {
    let dir = scratch_dir();
    let mut agent = unprivileged_agent(dir.path(), "auto")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(agent.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let started = line.contains("agent started");
        seen.push(line);
        if started {
            break;
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let log = seen.join("\n");
    assert!(
        log.contains("eBPF capture unavailable; capturing with nftables"),
        "{log}"
    );
    assert!(log.contains("CAP_BPF"), "the reason is given: {log}");
    assert!(
        seen.last()
            .is_some_and(|l| l.contains("capture=\"nftables\"")),
        "{log}"
    );
}
