//! DNS from a pod of the namespace mesh, one query at a time over UDP: through the agent's
//! proxy (a mesh name answered from the cluster, and an upstream name from the proxy's cache)
//! against asking the upstream server (dnsmasq, on a host outside the cluster) directly for the
//! same mesh name, under both capture backends, in one run. Needs root and a release build of
//! the agent:
//!
//! `cargo build --release -p ambit-agent && cargo bench -p ambit-integration --bench dns`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_agent::lab::{Cluster, InPod};
use ambit_integration::dns::Dnsmasq;
use ambit_integration::{Backend, ServiceYaml, agent_binary};
use ambit_test_support::measure::{self, Comparison};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

const QUERIES: usize = 5_000;
const WARMUP: usize = 200;
const NAMESERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const MESH_NAME: &str = "web.shop.svc.cluster.local.";
const UPSTREAM_NAME: &str = "api.example.test.";
/// Where the baseline asks dnsmasq: not port 53, which capture sends to the proxy.
const DIRECT_PORT: u16 = 5353;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let binary = agent_binary();
    assert!(
        binary.exists(),
        "build the agent first: cargo build --release -p ambit-agent"
    );
    println!(
        "DNS A queries from a pod, one at a time over UDP: dnsmasq asked directly (the baseline), \
         the agent's proxy answering a mesh name, and an upstream name from its cache"
    );
    for backend in [Backend::Ebpf, Backend::Nftables] {
        let mut cluster = Cluster::builder(&binary)
            .node("node1")
            .ambient_namespace("shop")
            .pod("node1", "shop", "client")
            .agent_args(&["--redirect", backend.flag()])
            .start()
            .await
            .unwrap();
        let internet = cluster.add_external_host("internet", 1).unwrap();
        let client_ip = cluster.addr("client", 80).unwrap().ip();
        cluster.set_extra_objects(
            &ServiceYaml {
                name: "web",
                namespace: "shop",
                vip: "10.96.0.10",
                port_name: "http",
                target: 8080,
                backends: &[client_ip],
                labels: "",
            }
            .to_string(),
        );
        cluster.write_config().unwrap();
        let records = [
            ("web.shop.svc.cluster.local", "10.96.0.10".parse().unwrap()),
            ("api.example.test", IpAddr::V4(internet.ips[0])),
        ];
        let upstream = Dnsmasq::start(&internet, 53, &records).await.unwrap();
        let direct = Dnsmasq::start(&internet, DIRECT_PORT, &records)
            .await
            .unwrap();
        // The proxy's speed, not the pod's rate limit.
        let args = [
            "--redirect",
            backend.flag(),
            "--dns-queries-per-second",
            "1000000",
        ];
        let _resolv_conf = upstream
            .forward_from(&mut cluster, NAMESERVER, &args)
            .await
            .unwrap();

        let pod = cluster.in_pod("client").unwrap();
        let proxy = SocketAddr::new(IpAddr::V4(NAMESERVER), 53);
        let baseline = queries(&pod, direct.addr, MESH_NAME).await;
        let mesh = queries(&pod, proxy, MESH_NAME).await;
        let cached = queries(&pod, proxy, UPSTREAM_NAME).await;

        let rate = |samples: &[Duration]| {
            samples.len() as f64 / samples.iter().sum::<Duration>().as_secs_f64()
        };
        let p50 = |samples: &[Duration]| measure::percentile_us(samples, 0.5);
        let p99 = |samples: &[Duration]| measure::percentile_us(samples, 0.99);
        let mut table = Comparison::new("direct", &["proxy mesh", "proxy cached"]);
        table.row(
            "queries/s (one at a time)",
            rate(&baseline),
            &[rate(&mesh), rate(&cached)],
        );
        table.row(
            "query p50 (us)",
            p50(&baseline),
            &[p50(&mesh), p50(&cached)],
        );
        table.row(
            "query p99 (us)",
            p99(&baseline),
            &[p99(&mesh), p99(&cached)],
        );
        println!("\n{} capture; ratio = subject / direct", backend.flag());
        print!("{}", table.render());
    }
}

/// `QUERIES` A queries for `name` to `server` from inside `pod`, one at a time on one socket,
/// after `WARMUP` unmeasured ones; sorted.
async fn queries(pod: &InPod, server: SocketAddr, name: &'static str) -> Vec<Duration> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let query = query.to_vec().unwrap();
    let mut samples = pod
        .run(move || {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            socket.connect(server).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reply = [0; 1500];
            let mut samples = Vec::with_capacity(QUERIES);
            for i in 0..WARMUP + QUERIES {
                let start = Instant::now();
                socket.send(&query).unwrap();
                let len = socket.recv(&mut reply).unwrap();
                let elapsed = start.elapsed();
                assert!(
                    len > 12 && reply[3] & 0x0f == 0,
                    "an answer: {:?}",
                    &reply[..len]
                );
                if i >= WARMUP {
                    samples.push(elapsed);
                }
            }
            samples
        })
        .await
        .unwrap();
    samples.sort();
    samples
}
