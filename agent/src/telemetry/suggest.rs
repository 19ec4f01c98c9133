//! AuthorizationPolicies that allow exactly the edges of a baseline: one ALLOW policy per
//! destination workload, selecting its pods by their labels, with one rule per source identity
//! and the ports it used. Meant to be reviewed, then applied before default-deny is turned on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use super::baseline::Edge;

/// The policies as a multi-document YAML stream.
pub fn suggest_policies(edges: &[Edge]) -> String {
    let mut workloads: BTreeMap<(&str, &str), Vec<&Edge>> = BTreeMap::new();
    for edge in edges {
        workloads
            .entry((&edge.destination_namespace, &edge.destination_workload))
            .or_default()
            .push(edge);
    }
    let mut yaml = String::from(
        "# AuthorizationPolicies allowing exactly the observed edges. Review before applying.\n",
    );
    for ((namespace, workload), edges) in workloads {
        let selector = common_selector(&edges);
        if selector.is_empty() {
            let _ = writeln!(
                yaml,
                "# {namespace}/{workload}: no label selects its pods; its {} edge(s) are not covered",
                edges.len()
            );
            continue;
        }
        let mut sources: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
        for edge in &edges {
            sources
                .entry(&edge.source_identity)
                .or_default()
                .insert(edge.port);
        }
        write_policy(&mut yaml, namespace, workload, &selector, &sources);
    }
    yaml
}

/// The labels every edge's destination had: a workload's labels may change between sightings.
fn common_selector<'e>(edges: &[&'e Edge]) -> BTreeMap<&'e str, &'e str> {
    let mut selector: BTreeMap<&str, &str> = edges[0]
        .destination_selector
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for edge in &edges[1..] {
        selector.retain(|k, v| edge.destination_selector.get(*k).map(String::as_str) == Some(*v));
    }
    selector
}

fn write_policy(
    yaml: &mut String,
    namespace: &str,
    workload: &str,
    selector: &BTreeMap<&str, &str>,
    sources: &BTreeMap<&str, BTreeSet<u16>>,
) {
    let _ = write!(
        yaml,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  action: ALLOW\n  selector:\n    matchLabels:\n",
        quoted(&format!("allow-observed-{workload}")),
        quoted(namespace),
    );
    for (key, value) in selector {
        let _ = writeln!(yaml, "      {}: {}", quoted(key), quoted(value));
    }
    yaml.push_str("  rules:\n");
    for (source, ports) in sources {
        // Istio writes principals without the `spiffe://` scheme.
        let principal = source.trim_start_matches("spiffe://");
        let ports: Vec<String> = ports.iter().map(|p| quoted(&p.to_string())).collect();
        let _ = write!(
            yaml,
            "  - from:\n    - source:\n        principals: [{}]\n    to:\n    - operation:\n        ports: [{}]\n",
            quoted(principal),
            ports.join(", "),
        );
    }
}

/// A YAML scalar that reads back as exactly `value`: a JSON string is valid YAML.
fn quoted(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use ambit_identity::Identity;

    use super::*;
    use crate::policy::Connection;
    use crate::source::file::parse;

    fn edge(source: &str, workload: &str, labels: &[(&str, &str)], port: u16) -> Edge {
        Edge {
            source_identity: format!("spiffe://cluster.local/ns/shop/sa/{source}"),
            destination_identity: format!("spiffe://cluster.local/ns/shop/sa/{workload}"),
            destination_namespace: "shop".into(),
            destination_workload: workload.into(),
            destination_selector: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            port,
            first_seen: 0,
            last_seen: 0,
            connections: 1,
        }
    }

    /// Default deny in the root namespace: an ALLOW policy that matches nothing.
    const DEFAULT_DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: default-deny, namespace: istio-system}\nspec: {}\n";

    fn allowed(yaml: &str, source: &str, labels: &[(&str, &str)], port: u16) -> bool {
        let state = parse(&format!("{DEFAULT_DENY}{yaml}"), "istio-system").unwrap();
        assert!(state.rejected_policies().is_empty(), "{yaml}");
        let identity: Identity = format!("spiffe://cluster.local/ns/shop/sa/{source}")
            .parse()
            .unwrap();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let ip: IpAddr = "10.244.1.10".parse().unwrap();
        let connection = Connection {
            source_ip: ip,
            source_identity: Some(&identity),
            destination_ip: ip,
            destination_port: port,
            destination_namespace: "shop",
            destination_labels: &labels,
            destination_services: &[],
            destination_waypoints: &[],
            request: None,
        };
        state.authorization().decide(&connection).allowed
    }

    #[test]
    fn suggested_policies_allow_exactly_the_observed_edges() {
        let backend = [("app", "backend"), ("version", "v1")];
        let edges = [
            edge("frontend", "backend", &backend, 8080),
            edge("frontend", "backend", &backend, 9090),
            edge("jobs", "backend", &backend, 8080),
            edge("frontend", "db", &[("app", "db")], 5432),
        ];
        let yaml = suggest_policies(&edges);
        assert!(allowed(&yaml, "frontend", &backend, 8080));
        assert!(allowed(&yaml, "frontend", &backend, 9090));
        assert!(allowed(&yaml, "jobs", &backend, 8080));
        assert!(allowed(&yaml, "frontend", &[("app", "db")], 5432));
        assert!(!allowed(&yaml, "jobs", &backend, 9090), "port not observed");
        assert!(
            !allowed(&yaml, "jobs", &[("app", "db")], 5432),
            "source not observed"
        );
        assert!(
            !allowed(&yaml, "frontend", &[("app", "cache")], 8080),
            "workload not observed"
        );
    }

    #[test]
    fn a_workload_without_labels_is_named_not_covered() {
        let yaml = suggest_policies(&[edge("frontend", "bare", &[], 80)]);
        assert!(
            yaml.contains("# shop/bare: no label selects its pods; its 1 edge(s) are not covered")
        );
        assert!(!yaml.contains("kind: AuthorizationPolicy"));
    }

    #[test]
    fn the_selector_keeps_only_labels_every_sighting_had() {
        let edges = [
            edge("a", "web", &[("app", "web"), ("version", "v1")], 80),
            edge("b", "web", &[("app", "web"), ("version", "v2")], 80),
        ];
        let yaml = suggest_policies(&edges);
        assert!(yaml.contains("\"app\": \"web\""));
        assert!(!yaml.contains("version"));
    }
}
