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
use ambit_agent::lab::{AgentProcess, Cluster, ClusterBuilder, EchoApp, read_peer_line};
use ambit_integration::{ALLOW_CLIENT, Prometheus, ServiceYaml, logged, two_teams};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const PAYLOAD: usize = 1000;

/// [`two_teams`] with `policies` and the Service `server` in front of the server, which echoes
/// on two ports.
async fn cluster(agent_args: &[&str], policies: &str) -> (Cluster, Vec<EchoApp>) {
    start(two_teams().agent_args(agent_args), policies).await
}

/// [`cluster`], built by `builder`.
async fn start(builder: ClusterBuilder, policies: &str) -> (Cluster, Vec<EchoApp>) {
    let mut cluster = builder.start().await.unwrap();
    let server = service(&cluster, "server", "shop", "10.96.0.10");
    cluster.set_extra_objects(&format!("{policies}{server}"));
    cluster.apply().await.unwrap();
    let server = cluster.in_pod("server").unwrap();
    let apps = vec![
        server.echo(APP_PORT).await.unwrap(),
        server.echo(OTHER_PORT).await.unwrap(),
    ];
    (cluster, apps)
}

/// The Service `name` at `vip` in front of the pod `name`, port 80 to `APP_PORT`, as YAML.
fn service(cluster: &Cluster, name: &str, namespace: &str, vip: &str) -> String {
    let ip = cluster.addr(name, APP_PORT).unwrap().ip();
    ServiceYaml {
        name,
        namespace,
        vip,
        port_name: "http",
        target: APP_PORT,
        backends: &[ip],
        labels: "",
    }
    .to_string()
}

async fn connect(cluster: &Cluster, from: &str, port: u16) -> std::io::Result<TcpStream> {
    connect_to(cluster, from, "server", port).await
}

async fn connect_to(
    cluster: &Cluster,
    from: &str,
    to: &str,
    port: u16,
) -> std::io::Result<TcpStream> {
    let addr = cluster.addr(to, port).unwrap();
    cluster.in_pod(from).unwrap().connect(addr).await
}

/// [`exchange_with`] the server.
async fn exchange(cluster: &Cluster, from: &str, port: u16) -> bool {
    exchange_with(cluster, from, "server", port).await
}

/// Sends `PAYLOAD` bytes from `from` to `port` of the echo server in `to`, reads them back and
/// closes; false when the connection is refused. The server also sends its greeting (the
/// client's IP).
async fn exchange_with(cluster: &Cluster, from: &str, to: &str, port: u16) -> bool {
    let attempt = async {
        let mut stream = connect_to(cluster, from, to, port).await?;
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
    let node2 = agent(&cluster, "node2");
    for source in [identity("shop", "client"), identity("ops", "admin")] {
        logged(|| node2.log(), &format!(r#""src.identity":"{source}""#)).await;
    }
    let log = node2.log();
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
    // The source's line names the same trace: the two ends' lines of a connection join on it.
    let trace_id = inbound["trace_id"].as_str().unwrap_or_default();
    assert_eq!(trace_id.len(), 32, "{inbound}");
    let node1 = agent(&cluster, "node1");
    logged(|| node1.log(), &format!("\"trace_id\":\"{trace_id}\"")).await;
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
    logged(|| node2.log(), "new edge").await;
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

/// The labels of Istio's TCP metrics in ztunnel, in its order: `CommonTrafficLabels` of
/// istio/ztunnel `src/proxy/metrics.rs` (commit 62d826530e5c), with its `LocalityLabels`
/// flattened at the end, written when either end's locality is known.
const ZTUNNEL_TRAFFIC_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
];

/// Every Istio metric ambit exports and the labels ztunnel gives it (same file: `Metrics::new`
/// and `SocketLabels`).
const ZTUNNEL_METRICS: &[(&str, &[&str])] = &[
    ("istio_tcp_connections_opened_total", ZTUNNEL_TRAFFIC_LABELS),
    ("istio_tcp_connections_closed_total", ZTUNNEL_TRAFFIC_LABELS),
    ("istio_tcp_connections_failed_total", ZTUNNEL_TRAFFIC_LABELS),
    ("istio_tcp_received_bytes_total", ZTUNNEL_TRAFFIC_LABELS),
    ("istio_tcp_sent_bytes_total", ZTUNNEL_TRAFFIC_LABELS),
    ("istio_tcp_sockets_open", &["reporter"]),
];

/// What consumers of Istio's metrics query: `tests/data/istio-consumer-queries.json`.
#[derive(serde::Deserialize)]
struct ConsumerQueries {
    sources: std::collections::BTreeMap<String, serde_json::Value>,
    queries: Vec<ConsumerQuery>,
}

#[derive(serde::Deserialize)]
struct ConsumerQuery {
    id: String,
    source: String,
    panel: String,
    expr: String,
}

impl ConsumerQueries {
    fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/istio-consumer-queries.json"
        );
        let queries: Self = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for query in &queries.queries {
            assert!(queries.sources.contains_key(&query.source), "{}", query.id);
        }
        queries
    }

    fn get(&self, id: &str) -> &ConsumerQuery {
        self.queries
            .iter()
            .find(|q| q.id == id)
            .unwrap_or_else(|| panic!("no query {id}"))
    }
}

impl ConsumerQuery {
    /// The query as the consumer sends it: Grafana's variables and Kiali's parameters bound.
    fn bind(&self, variables: &[(&str, &str)]) -> String {
        let mut expr = self.expr.clone();
        for (name, value) in variables {
            assert!(expr.contains(name), "{} has no {name}", self.id);
            expr = expr.replace(name, value);
        }
        for unbound in ["$", "{namespace}", "{duration_seconds}", "{rate_"] {
            assert!(!expr.contains(unbound), "{} left unbound: {expr}", self.id);
        }
        expr
    }
}

/// A series as a consumer reads it: label names and values.
type Series = std::collections::BTreeMap<String, String>;

/// A consumer's query, its variables bound to these values, and the series it must return.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<Series>);

/// The series with `labels`.
fn shown(labels: &[(&str, &str)]) -> Series {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Grafana's `$__rate_interval` for a 1 s scrape on a default panel, and Kiali's defaults: a
/// 10 minute graph, `rate` over 1 m.
const RATE_INTERVAL: (&str, &str) = ("$__rate_interval", "1m");
const KIALI_GRAPH: (&str, &str) = ("{duration_seconds}", "600");
const KIALI_METRICS: [(&str, &str); 2] = [("{rate_func}", "rate"), ("{rate_interval}", "1m")];
/// Grafana's "All" of the workload dashboard's multi-value variables, as the values it lists.
const ALL_SOURCE_NAMESPACES: (&str, &str) = ("$srcns", "(legacy|shop)");
const ALL_SOURCE_WORKLOADS: (&str, &str) = ("$srcwl", "(client|outsider)");
const ALL_SERVICES: (&str, &str) = (
    "$dstsvc",
    "(outsider.legacy.svc.cluster.local|server.shop.svc.cluster.local)",
);

/// Istio's Grafana dashboards (ztunnel, workload, mesh) and Kiali's graph, security-policy and
/// ztunnel queries, byte for byte, evaluated by a real Prometheus scraping both agents as a
/// Kubernetes scrape config of the chart installed for them would (release `ztunnel`,
/// `podLabels.app=ztunnel`): each returns exactly the series of the traffic, with its
/// workloads, namespaces, principals, cluster and security policy, from both reporters. And
/// every Istio metric carries ztunnel's labels, in ztunnel's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_dashboards_and_kiali_read_the_metrics_unchanged() {
    const CLOSED_PORT: u16 = 7070;
    let builder = two_teams()
        .agent_args(&["--cluster-id", "east"])
        .node_locality("node1", "eu-west1", "eu-west1-a")
        .node_locality("node2", "eu-west1", "eu-west1-b");
    let (mut cluster, _apps) = start(builder, "").await;
    // The outsider, out of the mesh, serves behind a Service of its own.
    let services = [
        service(&cluster, "server", "shop", "10.96.0.10"),
        service(&cluster, "outsider", "legacy", "10.96.0.11"),
    ];
    cluster.set_extra_objects(&services.concat());
    cluster.apply().await.unwrap();
    let _outsider = cluster.in_pod("outsider").unwrap().echo(APP_PORT).await;
    let prometheus = Prometheus::start(&cluster, "node1").await.unwrap();
    prometheus.wait_scraped().await.unwrap();

    // Across several scrapes: the client to the server over mTLS, the outsider to the server in
    // plaintext, the client to the outsider out of the mesh; and a port nobody listens on.
    assert!(!exchange(&cluster, "client", CLOSED_PORT).await);
    for _ in 0..12 {
        for (from, to) in [
            ("client", "server"),
            ("outsider", "server"),
            ("client", "outsider"),
        ] {
            assert!(
                exchange_with(&cluster, from, to, APP_PORT).await,
                "{from} to {to}:\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every Istio metric, from both agents, with ztunnel's labels in ztunnel's order.
    let mut exported = std::collections::BTreeSet::new();
    for node in ["node1", "node2"] {
        let text = agent(&cluster, node).metrics().await.unwrap();
        for line in text.lines().filter(|l| l.starts_with("istio_")) {
            let (metric, labels) = label_names(line);
            let expected = ZTUNNEL_METRICS
                .iter()
                .find(|(name, _)| *name == metric)
                .unwrap_or_else(|| panic!("{metric} is not one of ztunnel's metrics: {line}"));
            assert_eq!(labels, expected.1, "{line}");
            exported.insert(metric.to_owned());
        }
    }
    let ztunnel: std::collections::BTreeSet<String> = ZTUNNEL_METRICS
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    assert_eq!(exported, ztunnel);

    let client = identity("shop", "client");
    let server = identity("shop", "server");
    let pods = vec![
        shown(&[("pod", "ztunnel-ambit-node1")]),
        shown(&[("pod", "ztunnel-ambit-node2")]),
    ];
    let one_total = vec![shown(&[])];
    let shop_server = [("$namespace", "shop"), ("$workload", "server")];
    let shop_client = [("$namespace", "shop"), ("$workload", "client")];
    let incoming = |qrep| {
        vec![
            ("$qrep", qrep),
            shop_server[0],
            shop_server[1],
            ALL_SOURCE_WORKLOADS,
            ALL_SOURCE_NAMESPACES,
            RATE_INTERVAL,
        ]
    };
    let outgoing = vec![shop_client[0], shop_client[1], ALL_SERVICES, RATE_INTERVAL];
    let edge = |src: &str, src_ns: &str, dst: &str, dst_ns: &str| {
        let service = format!("{dst}.{dst_ns}.svc.cluster.local");
        shown(&[
            ("app", "ztunnel"),
            ("source_cluster", "east"),
            ("source_workload", src),
            ("source_workload_namespace", src_ns),
            ("destination_cluster", "east"),
            ("destination_workload", dst),
            ("destination_workload_namespace", dst_ns),
            ("destination_service", &service),
            ("response_flags", "-"),
        ])
    };
    let secured = |src: &str, src_principal: &str, dst: &str, dst_principal: &str, policy| {
        shown(&[
            ("source_cluster", "east"),
            ("source_workload", src),
            ("source_principal", src_principal),
            ("destination_cluster", "east"),
            ("destination_workload", dst),
            ("destination_principal", dst_principal),
            ("connection_security_policy", policy),
        ])
    };
    let service_of = |workload: &str, namespace: &str| {
        shown(&[
            ("destination_workload", workload),
            ("destination_workload_namespace", namespace),
            (
                "destination_service",
                &format!("{workload}.{namespace}.svc.cluster.local"),
            ),
        ])
    };
    let kiali_shop = vec![("{namespace}", "shop"), KIALI_GRAPH];
    let mut cases: Vec<Case<'_>> = Vec::new();
    for id in [
        "ztunnel-connections-opened",
        "ztunnel-connections-closed",
        "ztunnel-bytes-sent",
        "ztunnel-bytes-received",
    ] {
        cases.push((id, vec![RATE_INTERVAL], pods.clone()));
    }
    for id in ["ztunnel-tcp-connections", "ztunnel-open-sockets"] {
        cases.push((id, vec![], pods.clone()));
    }
    for id in [
        "kiali-ztunnel-connections-opened",
        "kiali-ztunnel-connections-closed",
    ] {
        cases.push((id, KIALI_METRICS.to_vec(), pods.clone()));
    }
    for qrep in ["destination", "source"] {
        let reporter = ("$qrep", qrep);
        let server_side = vec![reporter, shop_server[0], shop_server[1], RATE_INTERVAL];
        let client_side = vec![reporter, shop_client[0], shop_client[1], RATE_INTERVAL];
        cases.push((
            "workload-tcp-server-traffic",
            server_side,
            one_total.clone(),
        ));
        cases.push((
            "workload-tcp-client-traffic",
            client_side,
            one_total.clone(),
        ));
        let from_client = vec![shown(&[
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
        ])];
        for id in [
            "workload-incoming-received-mtls",
            "workload-incoming-sent-mtls",
        ] {
            cases.push((id, incoming(qrep), from_client.clone()));
        }
    }
    // Plaintext into the mesh: only the destination reports it.
    let from_outsider = vec![shown(&[
        ("source_workload", "outsider"),
        ("source_workload_namespace", "legacy"),
    ])];
    for id in [
        "workload-incoming-received-plaintext",
        "workload-incoming-sent-plaintext",
    ] {
        cases.push((id, incoming("destination"), from_outsider.clone()));
    }
    let to_service = |service: &str| vec![shown(&[("destination_service", service)])];
    for (id, service) in [
        (
            "workload-outgoing-sent-mtls",
            "server.shop.svc.cluster.local",
        ),
        (
            "workload-outgoing-received-mtls",
            "server.shop.svc.cluster.local",
        ),
        (
            "workload-outgoing-sent-plaintext",
            "outsider.legacy.svc.cluster.local",
        ),
        (
            "workload-outgoing-received-plaintext",
            "outsider.legacy.svc.cluster.local",
        ),
    ] {
        cases.push((id, outgoing.clone(), to_service(service)));
    }
    let served = vec![
        service_of("server", "shop"),
        service_of("outsider", "legacy"),
    ];
    for id in ["mesh-tcp-workloads-received", "mesh-tcp-workloads-sent"] {
        cases.push((id, vec![RATE_INTERVAL], served.clone()));
    }
    cases.extend([
        (
            "kiali-graph-tcp-into-namespace",
            kiali_shop.clone(),
            vec![
                edge("client", "shop", "server", "shop"),
                edge("outsider", "legacy", "server", "shop"),
            ],
        ),
        (
            "kiali-graph-tcp-out-of-namespace",
            kiali_shop.clone(),
            vec![
                edge("client", "shop", "server", "shop"),
                edge("client", "shop", "outsider", "legacy"),
            ],
        ),
        (
            "kiali-security-policy-into-namespace",
            kiali_shop.clone(),
            vec![secured(
                "outsider", "unknown", "server", "unknown", "unknown",
            )],
        ),
        (
            "kiali-security-policy-out-of-namespace",
            kiali_shop,
            vec![
                secured("client", &client, "server", &server, "mutual_tls"),
                secured("client", "unknown", "outsider", "unknown", "unknown"),
            ],
        ),
    ]);

    let queries = ConsumerQueries::load();
    for (id, variables, expected) in &cases {
        let query = queries.get(id);
        expect_series(&prometheus, query, &query.bind(variables), expected).await;
    }
    let checked: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.0).collect();
    let listed: std::collections::BTreeSet<&str> =
        queries.queries.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(checked, listed, "every consumer query is checked");

    // Where each end is, from the nodes' topology labels.
    let zones = |src: &str, dst: &str| {
        shown(&[
            ("source_region", "eu-west1"),
            ("source_zone", src),
            ("destination_region", "eu-west1"),
            ("destination_zone", dst),
        ])
    };
    let locality = ConsumerQuery {
        id: "locality".to_owned(),
        source: "ambit".to_owned(),
        panel: "bytes into the server by zone".to_owned(),
        expr: "sum by (source_region, source_zone, destination_region, destination_zone) \
               (istio_tcp_received_bytes_total{destination_workload=\"server\"})"
            .to_owned(),
    };
    let expected = vec![
        zones("eu-west1-a", "eu-west1-b"),
        zones("eu-west1-b", "eu-west1-b"),
    ];
    expect_series(&prometheus, &locality, &locality.expr, &expected).await;
}

/// Waits until Prometheus evaluates `expr` to exactly the series `expected`, each compared on
/// the labels the expectations name.
async fn expect_series(
    prometheus: &Prometheus,
    query: &ConsumerQuery,
    expr: &str,
    expected: &[Series],
) {
    let names: std::collections::BTreeSet<&String> =
        expected.iter().flat_map(|e| e.keys()).collect();
    let mut expected = expected.to_vec();
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let samples = prometheus.query(expr).await.unwrap();
        let mut seen: Vec<_> = samples
            .iter()
            .map(|s| {
                s.labels
                    .iter()
                    .filter(|(name, _)| names.contains(name))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Series>()
            })
            .collect();
        seen.sort();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} ({}, {}):\n{expr}\nexpected {expected:#?}\ngot {samples:#?}",
            query.id,
            query.source,
            query.panel
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The metric and label names of an exposition line, in order.
fn label_names(line: &str) -> (&str, Vec<&str>) {
    let (metric, mut rest) = line.split_once('{').unwrap_or((line, ""));
    let mut names = Vec::new();
    while let Some((name, value)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(','));
        // Past the value's closing quote: values never hold an escaped quote here.
        let end = value.find('"').unwrap();
        rest = &value[end + 1..];
    }
    (metric.split_whitespace().next().unwrap(), names)
}
