//! `ambit demo`: a two-node mesh in network namespaces on this machine, traffic through it, and
//! what the agents did with it, read from their access logs. Everything it creates is removed
//! when it ends.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lab::{Cluster, EchoApp, read_peer_line};

const APP_PORT: u16 = 8080;
/// The agents log a connection when it closes; this leaves them time to write it.
const LOG_SETTLE: Duration = Duration::from_millis(300);

/// Only the frontend may reach the backend.
const POLICY: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]
";

/// (from, to, what it shows)
const FLOWS: [(&str, &str, &str); 5] = [
    (
        "frontend",
        "backend",
        "mesh to mesh, across nodes, allowed by shop/backend",
    ),
    ("frontend", "cart", "mesh to mesh, same node"),
    (
        "cart",
        "backend",
        "mesh to mesh, not allowed by shop/backend",
    ),
    ("frontend", "billing", "mesh to a pod outside the mesh"),
    ("billing", "cart", "outside the mesh into the mesh"),
];

pub(crate) async fn run(out: &mut impl Write) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("finding the ambit binary")?;
    writeln!(
        out,
        "Building a mesh: 2 nodes, namespace `shop` in ambient mode, `legacy` outside it"
    )?;
    let mut cluster = Cluster::builder(&binary)
        .node("node1")
        .node("node2")
        .ambient_namespace("shop")
        .namespace("legacy")
        .pod("node1", "shop", "frontend")
        .pod("node1", "shop", "cart")
        .pod("node2", "shop", "backend")
        .pod("node2", "legacy", "billing")
        .start()
        .await?;
    for pod in cluster.topology().pods() {
        let name = format!("{}/{}", pod.namespace, pod.name);
        writeln!(out, "  {:<8} {name:<16} {}", pod.node, pod.ip)?;
    }
    let capture = cluster
        .agent("node1")
        .and_then(|agent| {
            agent.log().lines().find_map(|line| {
                let record: Value = serde_json::from_str(line).ok()?;
                Some(record["capture"].as_str()?.to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    writeln!(
        out,
        "Agents running and ready on node1 and node2 ({capture} capture)"
    )?;
    cluster.set_extra_objects(POLICY);
    cluster.apply().await?;
    writeln!(
        out,
        "Policy shop/backend: only shop/frontend may connect to the backend\n"
    )?;

    let mut apps: Vec<EchoApp> = Vec::new();
    for pod in ["frontend", "cart", "backend", "billing"] {
        apps.push(cluster.in_pod(pod)?.echo(APP_PORT).await?);
    }
    let mut results = Vec::new();
    for (from, to, _) in FLOWS {
        results.push(exchange(&cluster, from, to).await);
    }
    tokio::time::sleep(LOG_SETTLE).await;
    let access = access_logs(&cluster);

    report(out, &cluster, &results, &access)?;
    show_metrics(out, &cluster).await?;
    show_check(out, &cluster)?;
    writeln!(out, "\nRemoving the mesh's namespaces")?;
    drop(apps);
    drop(cluster);
    writeln!(out, "Done")?;
    Ok(())
}

/// One block per flow: its path through the mesh, what happened, and the agents' records.
fn report(
    out: &mut impl Write,
    cluster: &Cluster,
    results: &[anyhow::Result<String>],
    access: &[Value],
) -> anyhow::Result<()> {
    writeln!(out, "{:<34} {:<48} RESULT", "FLOW", "PATH")?;
    for ((from, to, what), result) in FLOWS.iter().zip(results) {
        let source = cluster.pod(from)?.ip;
        let path = describe_path(access, source.into(), cluster.addr(to, APP_PORT)?);
        let result = match result {
            Ok(seen) => format!("ok, app saw {seen}"),
            Err(_) if path.summary.starts_with("DENIED") => "closed, the app never saw it".into(),
            Err(error) => format!("failed: {error:#}"),
        };
        writeln!(
            out,
            "{:<34} {:<48} {result}",
            format!("{from} -> {to}"),
            path.summary
        )?;
        writeln!(out, "  {what}")?;
        for line in path.details {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

/// node2's view of the traffic into its pods, from Istio's metrics as Prometheus scrapes them.
async fn show_metrics(out: &mut impl Write, cluster: &Cluster) -> anyhow::Result<()> {
    let node2 = cluster.agent("node2").context("node2 has no agent")?;
    let metrics = node2.metrics().await?;
    writeln!(
        out,
        "\nMetrics of node2 (:15020/metrics), connections into its pods (reporter=destination):"
    )?;
    writeln!(
        out,
        "  {:<26} {:<24} {:<12} {:<14} COUNT",
        "METRIC", "SOURCE -> DESTINATION", "FLAGS", "SECURITY"
    )?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_") && l.contains("reporter=\"destination\"")
    }) {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?")
                .to_owned()
        };
        let (series, count) = line.rsplit_once(' ').unwrap_or((line, "?"));
        let metric = series.split('{').next().unwrap_or(series);
        writeln!(
            out,
            "  {:<26} {:<24} {:<12} {:<14} {count}",
            metric.trim_start_matches("istio_tcp_"),
            format!(
                "{} -> {}",
                label("source_workload"),
                label("destination_workload")
            ),
            label("response_flags"),
            label("connection_security_policy"),
        )?;
    }
    Ok(())
}

/// `ambit debug check` on node2: why cart may not reach the backend.
fn show_check(out: &mut impl Write, cluster: &Cluster) -> anyhow::Result<()> {
    let node2 = cluster.agent("node2").context("node2 has no agent")?;
    let args = ["check", "--from", "shop/cart", "--to", "shop/backend:8080"];
    let output = node2.debug(&args)?;
    writeln!(out, "\n$ ambit debug {}  (on node2)", args.join(" "))?;
    out.write_all(&output.stdout)?;
    out.write_all(&output.stderr)?;
    Ok(())
}

/// Connects `from` to `to`'s app, says hello, and returns the client address the app saw.
async fn exchange(cluster: &Cluster, from: &str, to: &str) -> anyhow::Result<String> {
    let mut stream = cluster
        .in_pod(from)?
        .connect(cluster.addr(to, APP_PORT)?)
        .await?;
    let seen = read_peer_line(&mut stream).await?;
    let hello = format!("hello from {from}");
    stream.write_all(hello.as_bytes()).await?;
    let mut echoed = vec![0; hello.len()];
    stream.read_exact(&mut echoed).await?;
    anyhow::ensure!(echoed == hello.as_bytes(), "the echo differs");
    Ok(seen)
}

/// The access-log records of every agent.
fn access_logs(cluster: &Cluster) -> Vec<Value> {
    ["node1", "node2"]
        .iter()
        .filter_map(|node| cluster.agent(node))
        .flat_map(|agent| {
            agent
                .log()
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|record| record["target"] == "access")
                .collect::<Vec<_>>()
        })
        .collect()
}

struct Path {
    summary: String,
    details: Vec<String>,
}

/// What the agents' records say about the connection from `source` to `destination`.
fn describe_path(access: &[Value], source: IpAddr, destination: SocketAddr) -> Path {
    let destination = destination.to_string();
    let from_source = |record: &Value| {
        record["src.addr"]
            .as_str()
            .and_then(|addr| addr.parse::<SocketAddr>().ok())
            .is_some_and(|addr| addr.ip() == source)
    };
    let records: Vec<&Value> = access
        .iter()
        .filter(|r| r["dst.addr"] == destination.as_str() && from_source(r))
        .collect();
    let find = |direction: &str| records.iter().find(|r| r["direction"] == direction);
    let text = |record: &Value, field: &str| record[field].as_str().unwrap_or("-").to_owned();
    let mut details = Vec::new();
    for record in &records {
        let outcome = match record["response_flags"].as_str() {
            Some(flags) => format!("{flags} {}", text(record, "policy")),
            None => format!(
                "{} bytes out, {} bytes back",
                record["bytes_sent"], record["bytes_received"]
            ),
        };
        details.push(format!(
            "{:<17} {} -> {}  ({outcome})",
            text(record, "direction"),
            text(record, "src.identity"),
            text(record, "dst.identity"),
        ));
    }
    let denied = records
        .iter()
        .find(|r| r["response_flags"] == "DENY")
        .map(|r| match r["policy"].as_str() {
            Some(policy) => format!("DENIED by {policy}"),
            None => "DENIED: no ALLOW policy matched".to_owned(),
        });
    let summary = match (find("outbound"), find("inbound"), find("inbound_plaintext")) {
        _ if denied.is_some() => denied.unwrap_or_default(),
        (Some(_), Some(_), _) => "HBONE: mTLS between the two agents".to_owned(),
        (Some(_), None, _) => "plain TCP: the destination is not in the mesh".to_owned(),
        (None, _, Some(_)) => "plain TCP into the mesh (no source identity)".to_owned(),
        _ => "not seen by any agent".to_owned(),
    };
    Path { summary, details }
}
