//! `ambit demo`, as a user runs it.

use std::process::{Command, Stdio};

use ambit_integration::agent_binary;

#[test]
fn the_demo_shows_tunneled_plain_and_denied_flows_and_cleans_up() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces: run as root"
    );
    let demo = Command::new(agent_binary())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id();
    let output = demo.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let flow = |name: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{stdout}"))
            .to_owned()
    };
    assert!(stdout.contains("(ebpf capture)"), "{stdout}");
    assert!(
        flow("frontend -> backend").contains("HBONE: mTLS"),
        "{stdout}"
    );
    assert!(flow("frontend -> cart").contains("HBONE: mTLS"), "{stdout}");
    assert!(
        flow("frontend -> billing").contains("not in the mesh"),
        "{stdout}"
    );
    assert!(
        flow("billing -> cart").contains("plain TCP into the mesh"),
        "{stdout}"
    );
    assert!(stdout.contains(
        "spiffe://cluster.local/ns/shop/sa/frontend -> spiffe://cluster.local/ns/shop/sa/backend"
    ));

    assert!(
        stdout.contains("connections_opened_total") && stdout.contains("cart -> backend"),
        "the demo shows the metrics:\n{stdout}"
    );
    assert!(
        stdout.contains("result: DENY: denied: ALLOW policies apply and none matches"),
        "the demo explains the denial:\n{stdout}"
    );

    let leftovers = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("ambit-lab-{pid}-"))
        })
        .count();
    assert_eq!(leftovers, 0, "the demo left namespaces behind");
}
