//! The sockets the agent connects out with, in a real namespace (needs root).

#![expect(clippy::unwrap_used, reason = "a failed setup step fails the test")]

#[expect(dead_code, reason = "this test needs no veth")]
mod common;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;

use ambit_redirect::Netns;
use ambit_redirect::socket::connector;
use common::{Namespaces, require_root, run};
use tokio::net::{TcpSocket, TcpStream};

/// Ephemeral ports in the test's namespace: few, so that one destination can use them all.
const PORTS: (u16, u16) = (40000, 40007);

#[tokio::test]
async fn an_ipv4_connector_shares_its_ports_across_destinations() {
    shares_ports_across_destinations("127.0.0.1".parse().unwrap(), "v4").await;
}

#[tokio::test]
async fn an_ipv6_connector_shares_its_ports_across_destinations() {
    shares_ports_across_destinations("::1".parse().unwrap(), "v6").await;
}

/// Connectors bound to `ip` and port 0, as the agent's in a pod, transparent as the inbound
/// path's: every port of the range connects to one destination, and another still connects.
async fn shares_ports_across_destinations(ip: IpAddr, name: &str) {
    require_root();
    let mut namespaces = Namespaces(Vec::new());
    let name = namespaces
        .add(format!("ambit-test-{}-ports-{name}", std::process::id()))
        .to_owned();
    run(&["-n", &name, "link", "set", "lo", "up"]);
    let netns = Netns::open(&Path::new("/var/run/netns").join(&name)).unwrap();
    let listeners = netns
        .run_in(|| {
            // The range of the thread's namespace, which `run_in` entered (IPv6 shares it).
            let range = format!("{} {}", PORTS.0, PORTS.1);
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", range).unwrap();
            [8080, 8081].map(|port| TcpListener::bind((ip, port)).unwrap())
        })
        .unwrap();
    let [busy, other] = listeners.each_ref().map(|l| l.local_addr().unwrap());
    let netns = &netns;
    let connect = |destination: SocketAddr| async move {
        let socket = netns
            .run_in(|| connector(SocketAddr::new(ip, 0), true))
            .unwrap()?;
        TcpSocket::from_std_stream(socket)
            .connect(destination)
            .await
    };

    let mut held: Vec<TcpStream> = Vec::new();
    for _ in PORTS.0..=PORTS.1 {
        held.push(connect(busy).await.unwrap());
    }
    let exhausted = connect(busy).await.unwrap_err();
    assert_eq!(
        exhausted.kind(),
        io::ErrorKind::AddrNotAvailable,
        "every port is in use towards {busy}: {exhausted}"
    );
    // A port chosen at bind would be taken for every destination.
    let shared = connect(other).await.unwrap().local_addr().unwrap().port();
    assert!(
        held.iter()
            .any(|h| h.local_addr().unwrap().port() == shared),
        "the connection to {other} shares port {shared} with one to {busy}"
    );
}
