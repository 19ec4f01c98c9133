//! Named network namespaces for the privileged tests, removed even when a test fails.

use std::process::Command;

/// Named namespaces that are deleted when dropped, even when the test fails.
pub(crate) struct Namespaces(pub(crate) Vec<String>);

impl Namespaces {
    pub(crate) fn add(&mut self, name: String) -> &str {
        run(&["netns", "add", &name]);
        self.0.push(name);
        self.0.last().map_or("", String::as_str)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A veth pair, `eth0` in `pod` and `eth0` in `peer`, with `address` (`IP/len`) on the pod's
/// end.
pub(crate) fn veth(pod: &str, peer: &str, address: &str) {
    run(&[
        "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "eth0", "netns", peer,
    ]);
    run(&["-n", pod, "addr", "add", address, "dev", "eth0"]);
}

/// `ip ARGS`, which must succeed.
pub(crate) fn run(args: &[&str]) {
    match Command::new("ip").args(args).status() {
        Ok(status) => assert!(status.success(), "ip {args:?} failed"),
        Err(error) => panic!("cannot run ip: {error}"),
    }
}

/// Panics with a clear message unless the test runs as root.
pub(crate) fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces: run it as root (CI does)"
    );
}
