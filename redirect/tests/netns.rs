//! Finding a pod's namespace by its IP, on real namespaces (needs root).

mod common;

use std::net::IpAddr;
use std::path::Path;

use ambit_redirect::Netns;
use common::{Namespaces, require_root, run, veth};

#[test]
fn finds_the_namespace_that_holds_the_ip_and_not_one_being_set_up() {
    require_root();
    let pid = std::process::id();
    let ip: IpAddr = format!("10.251.{}.{}", pid % 250, pid % 200 + 2)
        .parse()
        .unwrap();
    let mut namespaces = Namespaces(Vec::new());
    // A namespace whose loopback is still down accepts a bind to any address: it must not match.
    let fresh = namespaces.add(format!("ambit-test-{pid}-fresh")).to_owned();
    let pod = namespaces.add(format!("ambit-test-{pid}-pod")).to_owned();
    let peer = namespaces.add(format!("ambit-test-{pid}-peer")).to_owned();
    veth(&pod, &peer, &format!("{ip}/32"));
    run(&["-n", &pod, "link", "set", "eth0", "up"]);

    let mut namespaces = Netns::by_address().unwrap();
    let found = namespaces
        .remove(&ip)
        .expect("the pod's namespace holds the IP");
    let expected = Netns::open(&Path::new("/var/run/netns").join(&pod)).unwrap();
    let fresh = Netns::open(&Path::new("/var/run/netns").join(&fresh)).unwrap();
    assert_eq!(found.id(), expected.id());
    assert_ne!(found.id(), fresh.id());

    let nowhere: IpAddr = "10.252.0.1".parse().unwrap();
    assert!(!namespaces.contains_key(&nowhere));
}
