//! How `ambit debug` shows each view: aligned tables for people, JSON for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::admin::views::{
    AgentView, CertificateView, CheckView, ConnectionView, DnsView, Edge, PeerView, PoliciesView,
    ServiceView, WorkloadView,
};

/// `view` as pretty JSON, or as `table` renders it.
pub(super) fn output<T: Serialize>(view: &T, json: bool, table: impl Fn(&T) -> String) -> String {
    if json {
        serde_json::to_string_pretty(view).map_or_else(|e| e.to_string(), |text| text + "\n")
    } else {
        table(view)
    }
}

/// This agent, then the one it replaced, if any.
pub(super) fn agent(view: &AgentView) -> String {
    let mut table = Table::new(&[
        "AGENT",
        "PID",
        "VERSION",
        "CAPTURE",
        "STATE",
        "OPEN SOCKETS",
        "DEADLINE",
    ]);
    table.row(vec![
        "this".to_owned(),
        view.pid.to_string(),
        view.version.clone(),
        view.capture.clone(),
        format!(
            "serving for {}",
            span(Duration::from_secs(view.uptime_seconds))
        ),
        "-".to_owned(),
        "-".to_owned(),
    ]);
    if let Some(predecessor) = &view.predecessor {
        let draining = predecessor.state != "exited";
        table.row(vec![
            "previous".to_owned(),
            predecessor.pid.to_string(),
            "-".to_owned(),
            "-".to_owned(),
            if draining {
                format!("draining ({})", predecessor.state)
            } else {
                predecessor.state.clone()
            },
            predecessor.open_sockets.to_string(),
            if draining {
                format!("{}s", predecessor.deadline_seconds)
            } else {
                "-".to_owned()
            },
        ]);
    }
    table.render()
}

/// Columns padded to their widest cell.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            text.push_str(cells.join("  ").trim_end());
            text.push('\n');
        }
        text
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

fn join<T: ToString>(values: &[T]) -> String {
    let values: Vec<String> = values.iter().map(ToString::to_string).collect();
    if values.is_empty() {
        "-".to_owned()
    } else {
        values.join(",")
    }
}

/// `2026-11-23T17:43:27Z`.
fn timestamp(unix: u64) -> String {
    let format = time::format_description::well_known::Rfc3339;
    i64::try_from(unix)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// `3d4h`, `4h12m`, `12m5s`, `5s`.
fn span(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn age(unix: u64) -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(unix))
        .unwrap_or_default();
    span(since)
}

pub(super) fn workloads(workloads: &Vec<WorkloadView>) -> String {
    let mut table = Table::new(&[
        "NAMESPACE",
        "NAME",
        "IP",
        "NODE",
        "PROTOCOL",
        "IDENTITY",
        "WAYPOINT",
        "CAPTURE",
    ]);
    for w in workloads {
        table.row(vec![
            w.namespace.clone(),
            w.name.clone(),
            join(&w.ips),
            w.node.clone(),
            w.protocol.clone(),
            or_dash(w.identity.as_deref()),
            or_dash(w.waypoint.as_deref()),
            or_dash(w.capture.as_deref()),
        ]);
    }
    table.render()
}

pub(super) fn services(services: &Vec<ServiceView>) -> String {
    let mut table = Table::new(&[
        "NAMESPACE",
        "NAME",
        "VIPS",
        "PORTS",
        "ENDPOINTS",
        "WAYPOINT",
    ]);
    for s in services {
        let ready = s.endpoints.iter().filter(|e| e.ready).count();
        let mut endpoints = format!("{ready}/{} ready", s.endpoints.len());
        let ejected = s
            .endpoints
            .iter()
            .filter(|e| e.ejected_for_s.is_some())
            .count();
        if ejected > 0 {
            endpoints.push_str(&format!(", {ejected} ejected"));
        }
        table.row(vec![
            s.namespace.clone(),
            s.name.clone(),
            join(&s.vips),
            join(&s.ports),
            endpoints,
            or_dash(s.waypoint.as_deref()),
        ]);
    }
    table.render()
}

pub(super) fn policies(view: &PoliciesView) -> String {
    let mut table = Table::new(&["KIND", "NAME", "SCOPE", "ACTION", "DRY-RUN", "RULES"]);
    for p in &view.policies {
        table.row(vec![
            p.kind.clone(),
            p.name.clone(),
            p.scope.clone(),
            p.action.clone(),
            yes_no(p.dry_run),
            p.rules.to_string(),
        ]);
    }
    let mut text = table.render();
    for rejected in &view.rejected {
        text.push_str(&format!("rejected (enforced as deny): {rejected}\n"));
    }
    text
}

pub(super) fn certs(certs: &Vec<CertificateView>) -> String {
    let mut table = Table::new(&["IDENTITY", "SERIAL", "NOT-AFTER", "TIME-LEFT", "ERROR"]);
    for c in certs {
        table.row(vec![
            c.identity.clone(),
            or_dash(c.serial.as_deref()),
            c.not_after.map_or_else(|| "-".to_owned(), timestamp),
            c.seconds_left
                .map_or_else(|| "-".to_owned(), |s| span(Duration::from_secs(s))),
            or_dash(c.error.as_deref()),
        ]);
    }
    table.render()
}

pub(super) fn connections(connections: &Vec<ConnectionView>) -> String {
    let mut table = Table::new(&[
        "DIRECTION",
        "SRC",
        "DST",
        "SRC-IDENTITY",
        "DST-IDENTITY",
        "SENT",
        "RECEIVED",
        "AGE",
    ]);
    for c in connections {
        table.row(vec![
            c.direction.as_str().to_owned(),
            c.src.to_string(),
            c.dst.to_string(),
            or_dash(c.src_identity.as_deref()),
            or_dash(c.dst_identity.as_deref()),
            c.bytes_sent.to_string(),
            c.bytes_received.to_string(),
            age(c.opened_at),
        ]);
    }
    table.render()
}

pub(super) fn edges(edges: &Vec<Edge>) -> String {
    let mut table = Table::new(&[
        "SOURCE",
        "DESTINATION",
        "WORKLOAD",
        "PORT",
        "CONNECTIONS",
        "FIRST-SEEN",
        "LAST-SEEN",
    ]);
    for e in edges {
        table.row(vec![
            e.source_identity.clone(),
            e.destination_identity.clone(),
            format!("{}/{}", e.destination_namespace, e.destination_workload),
            e.port.to_string(),
            e.connections.to_string(),
            timestamp(e.first_seen),
            timestamp(e.last_seen),
        ]);
    }
    table.render()
}

pub(super) fn check(view: &CheckView) -> String {
    let peer = |peer: &PeerView| {
        let mut about = vec![];
        about.extend(peer.ip.map(|ip| ip.to_string()));
        about.extend(peer.identity.clone());
        format!(
            "{} ({})",
            or_dash(peer.workload.as_deref()),
            about.join(", ")
        )
    };
    let mut text = format!(
        "from:  {} over {}\nto:    {} port {}\n",
        peer(&view.source),
        view.transport,
        peer(&view.destination),
        view.port
    );
    if !view.waypoints.is_empty() {
        text.push_str(&format!("waypoints: {}\n", view.waypoints.join(", ")));
    }
    if let Some(mode) = &view.peer_authentication {
        text.push_str(&format!(
            "PeerAuthentication: {} ({})\n",
            mode.mode,
            mode.policy.as_deref().unwrap_or("default")
        ));
    }
    if view.policies.is_empty() {
        text.push_str("AuthorizationPolicies: none applies\n");
    } else {
        let mut table = Table::new(&["POLICY", "ACTION", "DRY-RUN", "MATCHED"]);
        for p in &view.policies {
            table.row(vec![
                p.policy.clone(),
                p.action.clone(),
                yes_no(p.dry_run),
                yes_no(p.matched),
            ]);
        }
        text.push_str(&table.render());
    }
    if let Some(egress) = &view.egress {
        text.push_str(&format!("egress ({}): {}\n", egress.policy, egress.reason));
    }
    let verdict = if view.allowed { "ALLOW" } else { "DENY" };
    text.push_str(&format!("result: {verdict}: {}\n", view.reason));
    text
}

pub(super) fn dns(view: &DnsView) -> String {
    let mut table = Table::new(&["AGE", "NAME", "TYPE", "RESULT", "ADDRESSES", "TTL", "FROM"]);
    for answer in &view.answers {
        table.row(vec![
            age(answer.at_unix),
            answer.name.clone(),
            answer.query_type.clone(),
            answer.code.clone(),
            join(&answer.addresses),
            format!("{}s", answer.ttl_s),
            answer.source.clone(),
        ]);
    }
    format!("{}\n{}", view.pod, table.render())
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::views::Direction;

    #[test]
    fn columns_are_aligned_and_directions_named_as_in_the_access_log() {
        let connection = ConnectionView {
            direction: Direction::InboundPlaintext,
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:8080".parse().unwrap(),
            src_identity: None,
            dst_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            src_workload: None,
            dst_workload: Some("shop/web".into()),
            src_cluster: "unknown".into(),
            src_region: "unknown".into(),
            src_zone: "unknown".into(),
            dst_cluster: "Kubernetes".into(),
            dst_region: "unknown".into(),
            dst_zone: "unknown".into(),
            opened_at: 0,
            bytes_sent: 12,
            bytes_received: 3456,
        };
        let table = connections(&vec![connection]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("inbound_plaintext  10.0.0.1:40000"),
            "{table}"
        );
        let column = |line: &str| line.find("10.0.0.2:8080").or_else(|| line.find("DST"));
        assert_eq!(column(lines[0]), column(lines[1]), "{table}");
    }

    #[test]
    fn spans_read_at_a_glance() {
        assert_eq!(span(Duration::from_secs(5)), "5s");
        assert_eq!(span(Duration::from_secs(125)), "2m5s");
        assert_eq!(span(Duration::from_secs(3 * 3600 + 120)), "3h2m");
        assert_eq!(span(Duration::from_secs(2 * 86_400 + 3600)), "2d1h");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
    }
}
