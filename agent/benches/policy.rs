//! Authorization cost per connection with 10, 1,000 and 10,000 policies applying to the
//! destination's namespace, against evaluating with no policy at all (the baseline).
//!
//! `cargo bench -p ambit-agent --bench policy`

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use ambit_agent::policy::{
    Action, AuthorizationPolicies, AuthorizationPolicy, Cidr, Connection, Field, PolicyName, Rule,
    Scope, Source, StringMatch,
};
use ambit_identity::Identity;

const EVALUATIONS: usize = 200_000;

fn main() {
    let identity: Identity = "spiffe://cluster.local/ns/shop/sa/frontend"
        .parse()
        .unwrap();
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    let connection = Connection {
        source_ip: "10.0.1.10".parse().unwrap(),
        source_identity: Some(&identity),
        destination_ip: "10.0.2.10".parse().unwrap(),
        destination_port: 8080,
        destination_namespace: "shop",
        destination_labels: &labels,
        destination_services: &[],
        destination_waypoints: &[],
        request: None,
    };
    let baseline = per_decision_ns(&AuthorizationPolicies::new("istio-system", []), &connection);
    println!(
        "Authorization per connection (one run; every policy names its callers, and the matching ALLOW sorts last)"
    );
    println!(
        "{:<12} {:>22} {:>14} {:>22} {:>14}",
        "policies", "all apply: ns/decision", "x no policy", "one each: ns/decision", "x no policy"
    );
    println!(
        "{:<12} {baseline:>22.0} {:>14.1} {baseline:>22.0} {:>14.1}",
        0, 1.0, 1.0
    );
    for count in [10, 1_000, 10_000] {
        let all_apply = AuthorizationPolicies::new("istio-system", (0..count).map(policy));
        let all_apply = per_decision_ns(&all_apply, &connection);
        let one_each = (0..count).map(|index| AuthorizationPolicy {
            scope: selecting(&format!("app-{index}")),
            ..policy(index)
        });
        let one_each = AuthorizationPolicies::new("istio-system", one_each);
        let one_each = per_decision_ns(&one_each, &connection);
        println!(
            "{count:<12} {all_apply:>22.0} {:>14.1} {one_each:>22.0} {:>14.1}",
            all_apply / baseline,
            one_each / baseline
        );
    }
}

/// Workloads labelled `app: <app>`.
fn selecting(app: &str) -> Scope {
    Scope::Selector([("app".to_owned(), app.to_owned())].into())
}

/// ALLOW policies that do not match the connection, but for the last one; half apply to the
/// whole namespace, half select the destination by label. "One each": each selects a workload
/// of its own, none of them the destination.
fn policy(index: usize) -> AuthorizationPolicy {
    let principal = if index == 0 {
        "cluster.local/ns/shop/sa/frontend".to_owned()
    } else {
        format!("cluster.local/ns/shop/sa/caller-{index}")
    };
    let scope = if index.is_multiple_of(2) {
        Scope::Namespace
    } else {
        selecting("web")
    };
    AuthorizationPolicy {
        // Policies are kept sorted by name: the matching one sorts last.
        name: PolicyName {
            namespace: "shop".into(),
            name: if index == 0 {
                "policy-matching".into()
            } else {
                format!("policy-{index:06}")
            },
        },
        scope,
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            from: vec![Source {
                principals: Field {
                    values: Some(vec![StringMatch::Exact(principal)]),
                    not_values: None,
                },
                ip_blocks: Field {
                    values: Some(vec![Cidr {
                        network: "10.0.0.0".parse().unwrap(),
                        prefix: 8,
                    }]),
                    not_values: None,
                },
                ..Source::default()
            }],
            ..Rule::default()
        }],
    }
}

fn per_decision_ns(policies: &AuthorizationPolicies, connection: &Connection<'_>) -> f64 {
    let start = Instant::now();
    for _ in 0..EVALUATIONS {
        black_box(policies.decide(black_box(connection)));
    }
    start.elapsed().as_nanos() as f64 / EVALUATIONS as f64
}
