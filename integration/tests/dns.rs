//! DNS and egress end to end on the namespace mesh, under both capture backends: a pod's
//! queries, to whatever server its resolv.conf names, reach the agent's proxy; mesh names are
//! answered from the cluster, the rest by a real upstream server (dnsmasq) on a host outside
//! the cluster; and `REGISTRY_ONLY` lets a pod reach only what ServiceEntries list.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_agent::admin::views::DnsView;
use ambit_agent::lab::topology::{ExternalHost, Topology};
use ambit_agent::lab::{Cluster, read_peer_line};
use ambit_integration::dns::{Dnsmasq, ask, exchange};
use ambit_integration::{Backend, ServiceYaml, logged, two_teams, with_each_backend};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};

/// What the pods' resolv.conf names: nothing answers there but the agent's proxy.
const NAMESERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const SERVER_VIP: &str = "10.96.0.10";
const APP_PORT: u16 = 8080;
/// Addresses dnsmasq answers for `big.example.test`: more than fit in 512 bytes.
const BIG_ANSWER: u8 = 60;

with_each_backend!(
    pods_resolve_mesh_names_and_upstream_names_through_the_agent,
    registry_only_lets_pods_reach_only_what_service_entries_list,
);

/// The namespace mesh with an external host (three addresses) running dnsmasq, the agents
/// forwarding to it, and every pod's resolv.conf set as kubelet would.
struct Lab {
    cluster: Cluster,
    internet: ExternalHost,
    _dnsmasq: Dnsmasq,
    _resolv_conf: tempfile::NamedTempFile,
}

async fn lab(backend: Backend, agent_args: &[&str], objects: &str) -> Lab {
    let mut cluster = two_teams()
        .agent_args(&["--redirect", backend.flag()])
        .start()
        .await
        .unwrap();
    let internet = cluster.add_external_host("internet", 3).unwrap();
    let [api, unlisted, _] = internet.ips[..] else {
        unreachable!()
    };
    let mut records = vec![
        ("api.example.test", IpAddr::V4(api)),
        ("unlisted.example.test", IpAddr::V4(unlisted)),
        (
            "server.shop.svc.cluster.local",
            "192.0.2.99".parse().unwrap(),
        ),
    ];
    for i in 0..BIG_ANSWER {
        records.push(("big.example.test", IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))));
    }
    let dnsmasq = Dnsmasq::start(&internet, 53, &records).await.unwrap();
    let server_ip = cluster.addr("server", APP_PORT).unwrap().ip();
    let services = [
        ServiceYaml {
            name: "server",
            namespace: "shop",
            vip: SERVER_VIP,
            port_name: "http",
            target: APP_PORT,
            backends: &[server_ip],
            labels: "",
        }
        .to_string(),
        format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop}}
spec: {{clusterIP: None, ports: [{{port: 5432}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-1, namespace: shop, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
ports: [{{port: 5432}}]
endpoints: [{{addresses: [{server_ip}], hostname: db-0, conditions: {{ready: true}}}}]
"
        ),
        objects.to_owned(),
    ];
    cluster.set_extra_objects(&services.concat());
    cluster.write_config().unwrap();
    let mut args = vec!["--redirect", backend.flag()];
    args.extend_from_slice(agent_args);
    let resolv_conf = dnsmasq
        .forward_from(&mut cluster, NAMESERVER, &args)
        .await
        .unwrap();
    Lab {
        cluster,
        internet,
        _dnsmasq: dnsmasq,
        _resolv_conf: resolv_conf,
    }
}

/// `getent <database> <name>` in `pod`, through its resolver: the addresses it printed.
fn getent(cluster: &Cluster, pod: &str, database: &str, name: &str) -> Vec<String> {
    let pod = cluster.pod(pod).unwrap();
    let output = Topology::command_in(&pod.netns, "getent")
        .args([database, name])
        .output()
        .unwrap();
    let mut addresses: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

fn addresses(answer: &hickory_proto::op::Message) -> Vec<String> {
    answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
            _ => None,
        })
        .collect()
}

async fn pods_resolve_mesh_names_and_upstream_names_through_the_agent(backend: Backend) {
    let lab = lab(backend, &[], "").await;
    let cluster = &lab.cluster;
    let server_ip = cluster.addr("server", APP_PORT).unwrap().ip().to_string();
    let api = lab.internet.ips[0].to_string();

    // The pod's resolver, its search path, and the proxy: short forms lead to the Service, not
    // to what upstream says of the same name.
    for name in [
        "server",
        "server.shop",
        "server.shop.svc",
        "server.shop.svc.cluster.local",
    ] {
        assert_eq!(
            getent(cluster, "client", "ahostsv4", name),
            [SERVER_VIP],
            "{name}\n{}",
            cluster.logs()
        );
    }
    assert_eq!(
        getent(cluster, "admin", "ahostsv4", "server.shop"),
        [SERVER_VIP]
    );
    assert_eq!(
        getent(cluster, "client", "ahostsv4", "db.shop.svc.cluster.local"),
        [server_ip.as_str()],
        "a headless Service answers its endpoints"
    );
    assert_eq!(
        getent(cluster, "client", "ahostsv4", "db-0.db"),
        [server_ip.as_str()],
        "a StatefulSet's pod by its hostname"
    );
    assert_eq!(
        getent(cluster, "client", "ahostsv4", "api.example.test"),
        [api.as_str()]
    );
    // 60 addresses do not fit in a UDP answer: the resolver asks again over TCP.
    let big = getent(cluster, "client", "ahostsv4", "big.example.test");
    assert_eq!(big.len(), usize::from(BIG_ANSWER), "{big:?}");
    assert!(getent(cluster, "client", "ahostsv4", "nothing.example.test").is_empty());

    // What the resolver does not show: the answers themselves.
    let pod = cluster.in_pod("client").unwrap();
    let proxy = SocketAddr::new(IpAddr::V4(NAMESERVER), 53);
    let fqdn = "server.shop.svc.cluster.local.";
    let aaaa = ask(&pod, proxy, fqdn, RecordType::AAAA, false)
        .await
        .unwrap();
    assert_eq!(
        aaaa.metadata.response_code,
        ResponseCode::NoError,
        "the name exists"
    );
    assert!(aaaa.answers.is_empty());
    let over_tcp = ask(&pod, proxy, fqdn, RecordType::A, true).await.unwrap();
    assert_eq!(addresses(&over_tcp), [SERVER_VIP]);
    assert!(over_tcp.metadata.authoritative);
    let udp = ask(&pod, proxy, "big.example.test.", RecordType::A, false)
        .await
        .unwrap();
    assert!(udp.metadata.truncation, "truncated over UDP");
    let tcp = ask(&pod, proxy, "big.example.test.", RecordType::A, true)
        .await
        .unwrap();
    assert_eq!(tcp.answers.len(), usize::from(BIG_ANSWER));
    let missing = ask(&pod, proxy, "nothing.cluster.local.", RecordType::A, false)
        .await
        .unwrap();
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    let txt = ask(&pod, proxy, "api.example.test.", RecordType::TXT, false)
        .await
        .unwrap();
    assert_eq!(
        txt.metadata.response_code,
        ResponseCode::NoError,
        "the name exists upstream, without TXT records"
    );

    // Hostile input: answered FORMERR or dropped, and the proxy goes on answering.
    let mut compression_loop = aaaa.to_vec().unwrap()[..12].to_vec();
    compression_loop[2] = 1; // a query, recursion desired
    compression_loop[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    compression_loop.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let reply = exchange(&pod, proxy, compression_loop, false)
        .await
        .unwrap();
    assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
    let mut long_name = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    let reply = exchange(&pod, proxy, long_name, true).await.unwrap();
    assert_eq!(reply[3] & 0x0f, 1, "FORMERR for a name over 255 bytes");
    assert!(
        exchange(&pod, proxy, vec![0xff; 7], false).await.is_err(),
        "too short to answer: dropped"
    );
    let after = ask(&pod, proxy, fqdn, RecordType::A, false).await.unwrap();
    assert_eq!(addresses(&after), [SERVER_VIP]);

    // Under ALLOW_ANY, an address the pod never resolved is reached.
    let internet = ambit_agent::lab::InPod::open(&lab.internet.netns_path()).unwrap();
    let _app = internet.echo(9443).await.unwrap();
    let mut stream = pod
        .connect(SocketAddr::new(IpAddr::V4(lab.internet.ips[2]), 9443))
        .await
        .unwrap();
    read_peer_line(&mut stream).await.unwrap();

    // Metrics, as ztunnel names them, and what the pod resolved.
    let node1 = cluster.agent("node1").unwrap();
    let metrics = node1.metrics().await.unwrap();
    for series in [
        r#"istio_dns_requests_total{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="latest"}"#,
        r#"istio_dns_requests_total{request_query_type="a",request_protocol="tcp",source_canonical_service="client",source_canonical_revision="latest"}"#,
        r#"istio_dns_upstream_requests_total{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="latest"}"#,
        r#"istio_dns_upstream_failures_total{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="latest"}"#,
        r#"istio_dns_upstream_request_duration_seconds_count{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="latest"}"#,
    ] {
        assert!(metrics.contains(series), "{series}\n{metrics}");
    }
    let output = node1
        .debug(&["dns", "--pod", "shop/client", "-o", "json"])
        .unwrap();
    let view: DnsView = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
    let answer = view
        .answers
        .iter()
        .find(|a| a.name == "api.example.test" && a.query_type == "A")
        .unwrap();
    assert_eq!(answer.addresses, [lab.internet.ips[0]]);
    assert_eq!(answer.source, "upstream");
    let table =
        String::from_utf8(node1.debug(&["dns", "--pod", "client"]).unwrap().stdout).unwrap();
    assert!(
        table.contains("server.shop.svc.cluster.local") && table.contains("mesh"),
        "{table}"
    );
}

async fn registry_only_lets_pods_reach_only_what_service_entries_list(backend: Backend) {
    let entries = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.test]
  location: MESH_EXTERNAL
  ports: [{number: 8443, name: https, protocol: TLS}]
  resolution: DNS
";
    let lab = lab(
        backend,
        &["--outbound-traffic-policy", "REGISTRY_ONLY"],
        entries,
    )
    .await;
    let cluster = &lab.cluster;
    let [api, unlisted, never_resolved] = lab.internet.ips[..] else {
        unreachable!()
    };
    let internet = ambit_agent::lab::InPod::open(&lab.internet.netns_path()).unwrap();
    let _listed = internet.echo(8443).await.unwrap();
    let _other = internet.echo(9443).await.unwrap();
    let _server = cluster
        .in_pod("server")
        .unwrap()
        .echo(APP_PORT)
        .await
        .unwrap();
    let pod = cluster.in_pod("client").unwrap();
    // Whether the pod reaches `addr`: the app's greeting comes back.
    let reaches = |addr: SocketAddr| {
        let pod = pod.clone();
        async move {
            let attempt = async {
                let mut stream = pod.connect(addr).await?;
                read_peer_line(&mut stream).await
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(10), attempt).await,
                Ok(Ok(_))
            )
        }
    };
    let addr = |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);

    assert!(!reaches(addr(api, 8443)).await, "not resolved yet");
    assert_eq!(
        getent(cluster, "client", "ahostsv4", "api.example.test"),
        [api.to_string()]
    );
    assert!(reaches(addr(api, 8443)).await, "{}", cluster.logs());
    assert!(
        !reaches(addr(api, 9443)).await,
        "a port the ServiceEntry does not list"
    );
    assert_eq!(
        getent(cluster, "client", "ahostsv4", "unlisted.example.test"),
        [unlisted.to_string()]
    );
    assert!(
        !reaches(addr(unlisted, 8443)).await,
        "a name no ServiceEntry lists"
    );
    assert!(
        !reaches(addr(never_resolved, 8443)).await,
        "an address never resolved"
    );
    assert!(
        reaches(cluster.addr("server", APP_PORT).unwrap()).await,
        "the mesh stays reachable"
    );
    let vip: SocketAddr = format!("{SERVER_VIP}:80").parse().unwrap();
    assert!(reaches(vip).await, "and its Services");
    // Another pod resolved nothing: what the client resolved does not open egress for it.
    let admin = cluster.in_pod("admin").unwrap();
    let attempt = async {
        let mut stream = admin.connect(addr(api, 8443)).await?;
        read_peer_line(&mut stream).await
    };
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_secs(10), attempt).await,
            Ok(Ok(_))
        ),
        "egress is per pod"
    );

    let node1 = cluster.agent("node1").unwrap();
    let metrics = node1.metrics().await.unwrap();
    for series in [
        r#"ambit_egress_denied_total{source_workload="client",source_workload_namespace="shop",destination_host="api.example.test",reason="unlisted_port"} 1"#,
        r#"ambit_egress_denied_total{source_workload="client",source_workload_namespace="shop",destination_host="unknown",reason="unlisted_destination"} 3"#,
    ] {
        assert!(metrics.contains(series), "{series}\n{metrics}");
    }
    let refused = format!(
        "egress to {unlisted}:8443 refused (REGISTRY_ONLY): no ServiceEntry lists the address"
    );
    logged(|| node1.log(), &refused).await;
    let check = |to: SocketAddr| {
        let to = to.to_string();
        let output = node1
            .debug(&["check", "--from", "shop/client", "--to", &to])
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    let allowed = check(addr(api, 8443));
    assert!(
        allowed.contains("the pod resolved api.example.test to this address")
            && allowed.contains("result: ALLOW"),
        "{allowed}"
    );
    let denied = check(addr(api, 9443));
    assert!(
        denied.contains("does not list port 9443") && denied.contains("result: DENY"),
        "{denied}"
    );
}

/// A pod that floods the proxy loses its own queries beyond its rate; another pod of the node
/// goes on resolving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_pod_loses_only_its_own_queries() {
    let lab = lab(Backend::Ebpf, &["--dns-queries-per-second", "200"], "").await;
    let cluster = &lab.cluster;
    let proxy = SocketAddr::new(IpAddr::V4(NAMESERVER), 53);
    let query = {
        let mut query = hickory_proto::op::Message::query();
        query.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("server.shop.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        query.to_vec().unwrap()
    };
    let flooder = cluster.in_pod("client").unwrap();
    let flood = tokio::spawn(async move {
        flooder
            .run(move || {
                let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                socket.connect(proxy).unwrap();
                let until = std::time::Instant::now() + Duration::from_secs(3);
                let mut sent = 0u64;
                while std::time::Instant::now() < until {
                    // Replies are never read: the socket's buffer fills and they are dropped.
                    if socket.send(&query).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
            .await
            .unwrap()
    });
    let admin = cluster.in_pod("admin").unwrap();
    for _ in 0..20 {
        let answer = ask(
            &admin,
            proxy,
            "server.shop.svc.cluster.local.",
            RecordType::A,
            false,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&answer), [SERVER_VIP]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = flood.await.unwrap();
    let metrics = cluster.agent("node1").unwrap().metrics().await.unwrap();
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix}\n{metrics}"))
    };
    let dropped = value(r#"ambit_dns_dropped_total{reason="rate_limited"}"#);
    let answered = value(
        r#"istio_dns_requests_total{request_query_type="a",request_protocol="udp",source_canonical_service="client",source_canonical_revision="latest"}"#,
    );
    // At 200 per second, after a burst of 400, over 3 s: about 1000 answered, whatever was
    // sent (the rest the proxy dropped, or the kernel when its socket's buffer was full).
    assert!(dropped > 0.0, "{sent} sent, none dropped");
    assert!(
        (400.0..=1200.0).contains(&answered),
        "{answered} of {sent} queries answered"
    );
}
