//! The `ambit` binary as a user runs it.

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
