//! What the agents tell about the traffic they carry, end to end on the namespace mesh: Istio's
//! metrics from both reporters, the access log, the admin API and every `ambit debug` command,
//! and the traffic baseline with the policies it suggests.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a helper that cannot observe the mesh fails the test"
)]

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use ambit_agent::admin::views::{
    CertificateView, CheckView, ConfigDump, ConnectionView, Edge, LoggingView, PoliciesView,
    ServiceView, WorkloadView,
};
use ambit_agent::lab::{AgentProcess, Cluster, EchoApp, read_peer_line};
use ambit_integration::{ALLOW_CLIENT, two_teams};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const PAYLOAD: usize = 1000;

/// [`two_teams`] with `policies` and the Service `server` in front of the server, which echoes
/// on two ports.
async fn cluster(agent_args: &[&str], policies: &str) -> (Cluster, Vec<EchoApp>) {
    let mut cluster = two_teams().agent_args(agent_args).start().await.unwrap();
    let server_ip = cluster.addr("server", APP_PORT).unwrap().ip();
    cluster.set_extra_objects(&format!(
        "{policies}---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: shop}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: server-1
  namespace: shop
  labels: {{kubernetes.io/service-name: server}}
addressType: IPv4
endpoints: [{{addresses: [{server_ip}], conditions: {{ready: true}}}}]
ports: [{{name: http, port: {APP_PORT}}}]
"
    ));
    cluster.apply().await.unwrap();
    let server = cluster.in_pod("server").unwrap();
    let apps = vec![
        server.echo(APP_PORT).await.unwrap(),
        server.echo(OTHER_PORT).await.unwrap(),
    ];
    (cluster, apps)
}

async fn connect(cluster: &Cluster, from: &str, port: u16) -> std::io::Result<TcpStream> {
    let addr = cluster.addr("server", port).unwrap();
    cluster.in_pod(from).unwrap().connect(addr).await
}

/// Sends `PAYLOAD` bytes from `from` to the server's `port`, reads them back and closes; false
/// when the connection is refused. The server also sends its greeting (the client's IP).
async fn exchange(cluster: &Cluster, from: &str, port: u16) -> bool {
    let attempt = async {
        let mut stream = connect(cluster, from, port).await?;
        read_peer_line(&mut stream).await?;
        stream.write_all(&[b'x'; PAYLOAD]).await?;
        let mut echoed = [0; PAYLOAD];
        stream.read_exact(&mut echoed).await?;
        stream.shutdown().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), attempt).await,
        Ok(Ok(()))
    )
}

fn agent<'c>(cluster: &'c Cluster, node: &str) -> &'c AgentProcess {
    cluster.agent(node).expect("the node has an agent")
}

/// Waits until the agent's metrics contain every line of `lines`, then returns them.
async fn metrics_with(agent: &AgentProcess, lines: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = agent.metrics().await.unwrap();
        let missing: Vec<&String> = lines.iter().filter(|l| !metrics.contains(*l)).collect();
        if missing.is_empty() {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "missing from the metrics:\n{missing:#?}\nmetrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One end of a connection, as the traffic labels name it.
struct End<'a> {
    workload: &'a str,
    namespace: &'a str,
    /// `None` for plaintext.
    principal: Option<&'a str>,
}

fn identity(namespace: &str, account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{account}")
}

/// The cluster of a workload the agent knows: the lab's agents run with the default
/// `--cluster-id`.
fn cluster_of(end: &End<'_>) -> &'static str {
    if end.workload == "unknown" {
        "unknown"
    } else {
        "Kubernetes"
    }
}

/// A series of an Istio TCP metric, its labels in the order the agent writes them (ztunnel's).
fn series(metric: &str, reporter: &str, src: &End<'_>, dst: &End<'_>, flags: &str) -> String {
    let mtls = src.principal.is_some() && dst.principal.is_some();
    format!(
        "{metric}{{reporter=\"{reporter}\",source_workload=\"{sw}\",source_canonical_service=\"{sw}\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"{sn}\",source_principal=\"{sp}\",\
source_app=\"{sw}\",source_version=\"latest\",source_cluster=\"{sc}\",\
destination_service=\"server.shop.svc.cluster.local\",\
destination_service_namespace=\"shop\",destination_service_name=\"server\",destination_workload=\"{dw}\",\
destination_canonical_service=\"{dw}\",destination_canonical_revision=\"latest\",\
destination_workload_namespace=\"{dn}\",destination_principal=\"{dp}\",destination_app=\"{dw}\",\
destination_version=\"latest\",destination_cluster=\"{dc}\",request_protocol=\"tcp\",\
response_flags=\"{flags}\",connection_security_policy=\"{security}\",source_region=\"unknown\",\
source_zone=\"unknown\",destination_region=\"unknown\",destination_zone=\"unknown\"}}",
        sw = src.workload,
        sc = cluster_of(src),
        dc = cluster_of(dst),
        sn = src.namespace,
        sp = src.principal.unwrap_or("unknown"),
        dw = dst.workload,
        dn = dst.namespace,
        dp = dst.principal.unwrap_or("unknown"),
        security = if mtls { "mutual_tls" } else { "unknown" },
    )
}

/// Runs `ambit debug ARGS` on `node` and parses its JSON output.
fn debug_json<T: DeserializeOwned>(cluster: &Cluster, node: &str, args: &[&str]) -> T {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let output = agent(cluster, node).debug(&args).unwrap();
    let stdout = success(&output, &args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}:\n{stdout}"))
}

/// Runs `ambit debug ARGS` on `node` and returns its table.
fn debug_table(cluster: &Cluster, node: &str, args: &[&str]) -> String {
    success(&agent(cluster, node).debug(args).unwrap(), args)
}

fn success(output: &Output, args: &[&str]) -> String {
    assert!(
        output.status.success(),
        "ambit debug {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The exit code and the stderr of a failing `ambit debug`.
fn failure(cluster: &Cluster, node: &str, args: &[&str]) -> (i32, String) {
    let output = agent(cluster, node).debug(args).unwrap();
    assert!(!output.status.success(), "ambit debug {args:?} succeeded");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    (output.status.code().unwrap(), stderr)
}

/// Every `istio_*` and `ambit_*` metric the Grafana dashboard queries.
fn dashboard_metrics() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemonset/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut metrics: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .flat_map(|target| {
            let expr = target["expr"].as_str().unwrap();
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("istio_") || word.starts_with("ambit_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    metrics.sort();
    metrics.dedup();
    assert!(metrics.len() >= 10, "{metrics:?}");
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_export_the_traffic_and_the_debug_cli_explains_it() {
    // The admin API bound to every address still answers loopback clients only.
    let (cluster, _apps) = cluster(&["--admin-addr", "0.0.0.0:15000"], ALLOW_CLIENT).await;
    assert!(
        exchange(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
    assert!(
        !exchange(&cluster, "admin", APP_PORT).await,
        "admin is denied"
    );

    let client = End {
        workload: "client",
        namespace: "shop",
        principal: Some(&identity("shop", "client")),
    };
    let server = End {
        workload: "server",
        namespace: "shop",
        principal: Some(&identity("shop", "server")),
    };
    let admin = End {
        workload: "admin",
        namespace: "ops",
        principal: Some(&identity("ops", "admin")),
    };
    let client_ip = cluster.addr("client", 0).unwrap().ip().to_string();
    // The server sends its greeting (the client's IP and a newline) and the echo.
    let from_server = PAYLOAD + client_ip.len() + 1;
    for (node, reporter) in [("node1", "source"), ("node2", "destination")] {
        let expected: Vec<String> = [
            ("connections_opened", &client, "-", 1),
            ("connections_closed", &client, "-", 1),
            ("received_bytes", &client, "-", PAYLOAD),
            ("sent_bytes", &client, "-", from_server),
            ("connections_opened", &admin, "-", 1),
            ("connections_closed", &admin, "DENY", 1),
            ("connections_failed", &admin, "DENY", 1),
        ]
        .iter()
        .map(|(metric, source, flags, value)| {
            let metric = format!("istio_tcp_{metric}_total");
            format!(
                "{} {value}",
                series(&metric, reporter, source, &server, flags)
            )
        })
        .collect();
        let metrics = metrics_with(agent(&cluster, node), &expected).await;
        assert!(
            !metrics.contains(
                "istio_tcp_connections_failed_total{reporter=\"source\",source_workload=\"client\""
            ),
            "the allowed connection did not fail"
        );
        assert!(metrics.contains("ambit_build_info{version=\""), "{metrics}");
        assert!(metrics.contains(
            "ambit_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/"
        ));
        assert!(metrics.contains("ambit_hbone_pool_connections "));
    }
    let node1 = agent(&cluster, "node1").metrics().await.unwrap();
    assert!(node1.contains("ambit_enrolled_pods 2\n"), "{node1}");
    // The dashboard and the agents speak of the metrics docs/metrics.md describes.
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
            .unwrap();
    for metric in dashboard_metrics() {
        assert!(
            documented.contains(&format!("`{metric}`")),
            "the dashboard queries {metric}, which is not documented"
        );
    }
    for exported in [&node1, &agent(&cluster, "node2").metrics().await.unwrap()] {
        for family in exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = family.split_once(' ').unwrap();
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            assert!(
                documented.contains(&format!("`{name}`")),
                "{name} is exported but not documented"
            );
        }
    }
    let node2 = agent(&cluster, "node2").metrics().await.unwrap();
    assert!(node2.contains("ambit_enrolled_pods 1\n"), "{node2}");
    assert!(
        node2.contains("ambit_policy_decisions_total{decision=\"allow\"} 1\n"),
        "{node2}"
    );
    assert!(
        node2.contains("ambit_policy_decisions_total{decision=\"deny\"} 1\n"),
        "{node2}"
    );
    // Ports and addresses never become labels.
    assert!(!node2.contains(&client_ip), "no IP in any label");

    // The access log: one line per connection, at close, from each end.
    let log = agent(&cluster, "node2").log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["target"] == "access")
        .collect();
    let inbound = lines
        .iter()
        .find(|l| l["src.identity"] == identity("shop", "client").as_str())
        .unwrap_or_else(|| panic!("no access line for the client:\n{log}"));
    assert_eq!(inbound["direction"], "inbound");
    assert_eq!(inbound["dst.identity"], identity("shop", "server").as_str());
    assert_eq!(inbound["src.workload"], "shop/client");
    assert_eq!(inbound["dst.workload"], "shop/server");
    // The lab's nodes have no topology labels.
    for end in ["src", "dst"] {
        assert_eq!(inbound[format!("{end}.cluster")], "Kubernetes");
        assert_eq!(inbound[format!("{end}.region")], "unknown");
        assert_eq!(inbound[format!("{end}.zone")], "unknown");
    }
    assert_eq!(inbound["bytes_received"], PAYLOAD);
    assert_eq!(inbound["bytes_sent"], from_server);
    let denied = lines
        .iter()
        .find(|l| l["src.identity"] == identity("ops", "admin").as_str())
        .unwrap_or_else(|| panic!("no access line for admin:\n{log}"));
    assert_eq!(denied["response_flags"], "DENY");
    assert_eq!(denied["error"], "denied by authorization policy");

    // config_dump: configuration, workloads, services, policies and certificates.
    let (status, body) = agent(&cluster, "node2")
        .get(15000, "/config_dump")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let dump: ConfigDump = serde_json::from_str(&body).unwrap();
    assert_eq!(dump.config.node, "node2");
    assert_eq!(dump.config.capture, "ebpf");
    assert_eq!(
        dump.config.admin_addr,
        "0.0.0.0:15000".parse::<SocketAddr>().unwrap()
    );
    let server_view = dump.workloads.iter().find(|w| w.name == "server").unwrap();
    assert_eq!(server_view.capture.as_deref(), Some("captured"));
    assert_eq!(server_view.identity, Some(identity("shop", "server")));
    assert!(
        dump.workloads
            .iter()
            .any(|w| w.name == "outsider" && w.protocol == "TCP" && w.capture.is_none())
    );
    assert_eq!(dump.services.len(), 1);
    assert_eq!(dump.services[0].hostname, "server.shop.svc.cluster.local");
    assert!(
        dump.policies
            .policies
            .iter()
            .any(|p| p.name == "shop/allow-client" && p.action == "ALLOW")
    );
    assert_eq!(dump.certificates.len(), 1);
    assert_eq!(dump.certificates[0].identity, identity("shop", "server"));

    // Every `ambit debug` command, as a table and as JSON.
    let workloads: Vec<WorkloadView> = debug_json(&cluster, "node1", &["workloads"]);
    assert_eq!(workloads.len(), 4);
    let table = debug_table(&cluster, "node1", &["workloads"]);
    assert!(table.starts_with("NAMESPACE"), "{table}");
    let client_row = table.lines().find(|l| l.contains(" client ")).unwrap();
    assert!(
        client_row.contains("HBONE") && client_row.ends_with("captured"),
        "{table}"
    );

    let services: Vec<ServiceView> = debug_json(&cluster, "node1", &["services"]);
    assert_eq!(
        services[0].vips,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    let table = debug_table(&cluster, "node1", &["services"]);
    assert!(
        table.contains("80 -> 8080") && table.contains("1/1 ready"),
        "{table}"
    );

    let policies: PoliciesView = debug_json(&cluster, "node2", &["policies"]);
    assert_eq!(policies.policies.len(), 1);
    assert!(policies.rejected.is_empty());
    let table = debug_table(&cluster, "node2", &["policies"]);
    assert!(
        table.contains("shop/allow-client") && table.contains("selector app=server"),
        "{table}"
    );

    let certs: Vec<CertificateView> = debug_json(&cluster, "node1", &["certs"]);
    let mut identities: Vec<&str> = certs.iter().map(|c| c.identity.as_str()).collect();
    identities.sort_unstable();
    assert_eq!(
        identities,
        [identity("ops", "admin"), identity("shop", "client")]
    );
    assert!(
        certs
            .iter()
            .all(|c| c.seconds_left.unwrap() > 3600 && c.serial.is_some())
    );
    let table = debug_table(&cluster, "node1", &["certs"]);
    assert!(
        table.contains("TIME-LEFT") && table.contains(&identity("shop", "client")),
        "{table}"
    );

    // A connection held open is listed by both agents, with its identities and bytes so far.
    let mut held = connect(&cluster, "client", OTHER_PORT).await.unwrap();
    read_peer_line(&mut held).await.unwrap();
    held.write_all(b"ping\n").await.unwrap();
    let mut echoed = [0; 5];
    held.read_exact(&mut echoed).await.unwrap();
    for (node, direction, sent, received) in [
        ("node1", "outbound", 5, client_ip.len() + 1 + 5),
        ("node2", "inbound", client_ip.len() + 1 + 5, 5),
    ] {
        let open: Vec<ConnectionView> = debug_json(&cluster, node, &["connections"]);
        let [connection] = open.as_slice() else {
            panic!("{node}: one open connection, not {open:?}");
        };
        assert_eq!(
            serde_json::to_value(connection.direction).unwrap(),
            direction
        );
        assert_eq!(connection.src_identity, Some(identity("shop", "client")));
        assert_eq!(connection.dst_identity, Some(identity("shop", "server")));
        assert_eq!(
            (
                connection.src_cluster.as_str(),
                connection.dst_cluster.as_str()
            ),
            ("Kubernetes", "Kubernetes")
        );
        assert_eq!(connection.dst_zone, "unknown");
        assert_eq!(connection.dst.port(), OTHER_PORT);
        assert_eq!(
            (connection.bytes_sent, connection.bytes_received),
            (sent as u64, received as u64)
        );
        let table = debug_table(&cluster, node, &["connections"]);
        assert!(
            table.contains(direction) && table.contains(&identity("shop", "client")),
            "{table}"
        );
    }
    drop(held);

    let level: LoggingView = debug_json(&cluster, "node2", &["log-level"]);
    assert_eq!(level.level, "info");
    let changed: LoggingView = debug_json(&cluster, "node2", &["log-level", "debug,access=info"]);
    assert_eq!(
        changed.level, "access=info,debug",
        "as the filter normalises it"
    );
    assert_eq!(
        debug_table(&cluster, "node2", &["log-level"]),
        "access=info,debug\n"
    );
    debug_table(&cluster, "node2", &["log-level", "info"]);

    let allowed: CheckView = debug_json(
        &cluster,
        "node1",
        &["check", "--from", "shop/client", "--to", "server:8080"],
    );
    assert!(allowed.allowed);
    assert_eq!(allowed.transport, "mutual_tls");
    assert_eq!(allowed.decided_by.as_deref(), Some("shop/allow-client"));
    assert_eq!(allowed.policies.len(), 1);
    assert!(allowed.policies[0].matched);
    let denied: CheckView = debug_json(
        &cluster,
        "node1",
        &[
            "check",
            "--from",
            &identity("ops", "admin"),
            "--to",
            "shop/server:8080",
        ],
    );
    assert!(!denied.allowed);
    assert_eq!(
        denied.reason,
        "denied: ALLOW policies apply and none matches"
    );
    let outsider_ip = cluster.addr("outsider", 0).unwrap().ip().to_string();
    let server_ip = cluster.addr("server", 0).unwrap().ip().to_string();
    let plaintext = debug_table(
        &cluster,
        "node2",
        &[
            "check",
            "--from",
            &outsider_ip,
            "--to",
            &format!("{server_ip}:8080"),
        ],
    );
    assert!(plaintext.contains("over plaintext"), "{plaintext}");
    assert!(
        plaintext.contains("PeerAuthentication: PERMISSIVE (default)"),
        "{plaintext}"
    );
    assert!(
        plaintext.contains("shop/allow-client  ALLOW   no       no"),
        "{plaintext}"
    );
    assert!(
        plaintext.ends_with("result: DENY: denied: ALLOW policies apply and none matches\n"),
        "{plaintext}"
    );

    let edges: Vec<Edge> = debug_json(&cluster, "node2", &["edges"]);
    let observed: Vec<(&str, u16)> = edges
        .iter()
        .map(|e| (e.source_identity.as_str(), e.port))
        .collect();
    let client_identity = identity("shop", "client");
    assert_eq!(
        observed,
        [
            (client_identity.as_str(), APP_PORT),
            (client_identity.as_str(), OTHER_PORT)
        ]
    );
    let table = debug_table(&cluster, "node2", &["edges"]);
    assert!(
        table.contains("shop/server") && table.contains("FIRST-SEEN"),
        "{table}"
    );
    let yaml = debug_table(&cluster, "node2", &["suggest-policy"]);
    assert!(yaml.contains("name: \"allow-observed-server\""), "{yaml}");

    // Bad input: one clear line and a non-zero exit.
    let (code, stderr) = failure(&cluster, "node1", &["workloads", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: no ambit agent answers at 127.0.0.1:1"),
        "{stderr}"
    );
    let (code, stderr) = failure(&cluster, "node1", &["workloads", "--admin", "node2"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--admin \"node2\" is not an address"),
        "{stderr}"
    );
    let (code, stderr) = failure(
        &cluster,
        "node1",
        &["check", "--from", "nobody", "--to", "server:8080"],
    );
    assert_eq!(code, 1);
    assert_eq!(stderr, "error: no pod named \"nobody\"\n");
    let (code, stderr) = failure(
        &cluster,
        "node1",
        &["check", "--from", "client", "--to", "server"],
    );
    assert_eq!(code, 2);
    assert_eq!(stderr, "error: \"server\" is not <pod|ip>:<port>\n");

    // The admin API refuses clients that are not on the node's loopback.
    let node2_ip = cluster.topology().nodes()[1].ip;
    let (status, body) = agent(&cluster, "node1")
        .get_from(SocketAddr::new(node2_ip.into(), 15000), "/config_dump")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback clients only"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_edges_stand_out_and_suggested_policies_keep_exactly_the_baseline() {
    let learning = Duration::from_secs(4);
    let started = Instant::now();
    let (mut cluster, _apps) = cluster(&["--baseline-learn", "4s"], "").await;
    assert!(
        exchange(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
    assert!(exchange(&cluster, "admin", OTHER_PORT).await);
    tokio::time::sleep(learning.saturating_sub(started.elapsed()) + Duration::from_secs(1)).await;

    // Seen during learning: not new. Never seen: new, once.
    assert!(exchange(&cluster, "client", APP_PORT).await);
    assert!(exchange(&cluster, "client", OTHER_PORT).await);
    assert!(exchange(&cluster, "client", OTHER_PORT).await);
    let node2 = agent(&cluster, "node2");
    metrics_with(node2, &["ambit_new_edges_total 1\n".to_owned()]).await;
    let log = node2.log();
    let new_edge = log
        .lines()
        .find(|l| l.contains("new edge"))
        .unwrap_or_else(|| panic!("no new edge logged:\n{log}"));
    assert!(
        new_edge.contains(&format!("\"port\":{OTHER_PORT}")),
        "{new_edge}"
    );
    assert!(new_edge.contains(&identity("shop", "client")), "{new_edge}");

    let edges: Vec<Edge> = debug_json(&cluster, "node2", &["edges"]);
    assert_eq!(edges.len(), 3);
    let repeated = edges.iter().find(|e| e.port == APP_PORT).unwrap();
    assert_eq!(repeated.connections, 2);

    // Default deny plus the suggestion: the observed flows stay allowed, a new one is denied.
    let suggested = debug_table(&cluster, "node2", &["suggest-policy"]);
    let default_deny = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: default-deny, namespace: istio-system}
spec: {}
";
    cluster.set_extra_objects(&format!("{default_deny}{suggested}"));
    cluster.apply().await.unwrap();
    let policies: PoliciesView = debug_json(&cluster, "node2", &["policies"]);
    assert!(policies.rejected.is_empty(), "{:?}", policies.rejected);
    assert!(
        exchange(&cluster, "client", APP_PORT).await,
        "{}",
        cluster.logs()
    );
    assert!(exchange(&cluster, "client", OTHER_PORT).await);
    assert!(exchange(&cluster, "admin", OTHER_PORT).await);
    assert!(
        !exchange(&cluster, "admin", APP_PORT).await,
        "never observed"
    );
}
