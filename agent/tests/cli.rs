//! The `ambit` binary as a user runs it.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot run the binary fails the test"
)]

use std::process::Command;

fn ambit(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args(args)
        .output()
}

#[test]
fn version_names_the_crypto_provider() {
    let output = ambit(&["version"]).unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.starts_with(&format!("ambit {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("crypto provider: aws-lc-rs"), "{stdout}");
    assert!(stdout.contains("TLS13_AES_256_GCM_SHA384"), "{stdout}");
}

#[test]
fn unknown_subcommands_fail_with_usage() {
    let output = ambit(&["frobnicate"]).unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage:"));
}

/// Runs a failing `ambit debug` and returns its exit code and its one line on stderr.
fn debug_failure(args: &[&str]) -> (i32, String) {
    let mut all = vec!["debug"];
    all.extend(args);
    let output = ambit(&all).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(output.stdout.is_empty());
    (output.status.code().unwrap(), stderr)
}

#[test]
fn debug_without_an_agent_says_so_in_one_line() {
    let (code, stderr) = debug_failure(&["certs", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: no ambit agent answers at 127.0.0.1:1 ("),
        "{stderr}"
    );
}

#[test]
fn debug_refuses_bad_input_before_asking() {
    let (code, stderr) = debug_failure(&["workloads", "--admin", "localhost"]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr,
        "error: --admin \"localhost\" is not an address such as 127.0.0.1:15000\n"
    );
    // No agent listens there: a malformed --to is refused before any connection.
    let (code, stderr) = debug_failure(&[
        "check",
        "--from",
        "a",
        "--to",
        "b:http",
        "--admin",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 2);
    assert_eq!(stderr, "error: \"b:http\" is not <pod|ip>:<port>\n");
}

#[test]
fn suggest_policy_reads_saved_edges() {
    let dir = tempfile::tempdir().unwrap();
    let edges = dir.path().join("edges.json");
    std::fs::write(
        &edges,
        r#"[{"source_identity":"spiffe://cluster.local/ns/shop/sa/frontend",
             "destination_identity":"spiffe://cluster.local/ns/shop/sa/backend",
             "destination_namespace":"shop","destination_workload":"backend",
             "destination_selector":{"app":"backend"},"port":8080,
             "first_seen":0,"last_seen":0,"connections":3}]"#,
    )
    .unwrap();
    let output = ambit(&[
        "debug",
        "suggest-policy",
        "--edges",
        edges.to_str().unwrap(),
    ])
    .unwrap();
    assert!(output.status.success());
    let yaml = String::from_utf8(output.stdout).unwrap();
    assert!(yaml.contains("name: \"allow-observed-backend\""), "{yaml}");
    assert!(
        yaml.contains("principals: [\"cluster.local/ns/shop/sa/frontend\"]"),
        "{yaml}"
    );

    std::fs::write(&edges, "not json").unwrap();
    let (code, stderr) = debug_failure(&["suggest-policy", "--edges", edges.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("not the JSON of `ambit debug edges -o json`"),
        "{stderr}"
    );
}

#[test]
fn cni_install_then_uninstall_leaves_the_node_as_it_was() {
    let conflist = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"net\",\n  \"plugins\": [\n    {\"type\": \"bridge\"}\n  ]\n}\n";
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let primary = conf.path().join("10-net.conflist");
    std::fs::write(&primary, conflist).unwrap();
    let plugin = conf.path().join("plugin-source");
    std::fs::write(&plugin, b"binary").unwrap();
    let dirs = [
        "--conf-dir",
        conf.path().to_str().unwrap(),
        "--bin-dir",
        bin.path().to_str().unwrap(),
    ];

    let mut install = vec![
        "cni",
        "install",
        "--plugin-binary",
        plugin.to_str().unwrap(),
    ];
    install.extend(dirs);
    let output = ambit(&install).unwrap();
    assert!(output.status.success(), "{output:?}");
    let written = std::fs::read_to_string(&primary).unwrap();
    assert!(
        written.contains("\"agentSocket\": \"/var/run/ambit/cni.sock\""),
        "{written}"
    );
    assert_eq!(
        std::fs::read(bin.path().join("ambit-cni")).unwrap(),
        b"binary"
    );

    let mut uninstall = vec!["cni", "uninstall"];
    uninstall.extend(dirs);
    let output = ambit(&uninstall).unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), conflist);
    assert!(!bin.path().join("ambit-cni").exists());
}

#[test]
fn cni_install_without_a_network_fails_and_says_why() {
    let conf = tempfile::tempdir().unwrap();
    let plugin = conf.path().join("plugin-source");
    std::fs::write(&plugin, b"binary").unwrap();
    let output = ambit(&[
        "cni",
        "install",
        "--conf-dir",
        conf.path().to_str().unwrap(),
        "--bin-dir",
        conf.path().to_str().unwrap(),
        "--plugin-binary",
        plugin.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no CNI network configuration in"),
        "{stderr}"
    );
}

#[test]
fn a_kubeconfig_from_the_service_account_outside_a_pod_fails_before_writing() {
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let plugin = conf.path().join("plugin-source");
    std::fs::write(&plugin, b"binary").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args([
            "cni",
            "install",
            "--conf-dir",
            conf.path().to_str().unwrap(),
            "--bin-dir",
            bin.path().to_str().unwrap(),
            "--plugin-binary",
            plugin.to_str().unwrap(),
            "--kubeconfig-from-service-account",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--kubeconfig-from-service-account needs KUBERNETES_SERVICE_HOST"),
        "{stderr}"
    );
    assert!(!bin.path().join("ambit-cni").exists());
}

#[test]
fn a_kubeconfig_file_and_one_from_the_service_account_exclude_each_other() {
    let output = ambit(&[
        "cni",
        "install",
        "--plugin-binary",
        "/nonexistent",
        "--kubeconfig",
        "/nonexistent",
        "--kubeconfig-from-service-account",
    ])
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
