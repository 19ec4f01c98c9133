//! The sockets the agent connects out with, in a real namespace (needs root).

#[expect(dead_code, reason = "this test needs no veth")]
mod common;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use ambit_redirect::Netns;
use ambit_redirect::socket::connector;
use common::{Namespaces, require_root, run};
use tokio::net::{TcpSocket, TcpStream};

/// Ephemeral ports in the test's namespace: few, so that one destination can use them all.
const PORTS: (u16, u16) = (40000, 40007);

#[tokio::test]
async fn a_connector_bound_to_port_0_shares_its_ports_across_destinations() {
    require_root();
    let mut namespaces = Namespaces(Vec::new());
    let name = namespaces
        .add(format!("ambit-test-{}-ports", std::process::id()))
        .to_owned();
    run(&["-n", &name, "link", "set", "lo", "up"]);
    let range = format!("net.ipv4.ip_local_port_range={} {}", PORTS.0, PORTS.1);
    run(&["netns", "exec", &name, "sysctl", "-q", "-w", &range]);
    let netns = Netns::open(&Path::new("/var/run/netns").join(&name)).unwrap();
    let listeners = netns
        .run_in(|| ["127.0.0.1:8080", "127.0.0.1:8081"].map(|a| TcpListener::bind(a).unwrap()))
        .unwrap();
    let [busy, other] = listeners.each_ref().map(|l| l.local_addr().unwrap());
    let netns = &netns;
    let connect = |destination: SocketAddr| async move {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let socket = netns.run_in(|| connector(local, false)).unwrap()?;
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
    let shared = connect(other).await.unwrap();
    assert!(
        (PORTS.0..=PORTS.1).contains(&shared.local_addr().unwrap().port()),
        "the connection to {other} reuses a port of the range"
    );
}
