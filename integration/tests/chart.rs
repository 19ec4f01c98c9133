//! The agent's RBAC, as `daemonset/manifests/ambit.yaml` (the chart rendered with its default
//! values, kept equal to the chart by `scripts/validate-chart`) grants it: no wildcard and nothing
//! about Secrets in any Role or ClusterRole, no aggregated role, bindings only to the roles defined
//! there, and a ClusterRole that grants exactly the permissions listed in [`REVIEWED`], so that a
//! new permission is a reviewed change of that list. Needs no root.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// What the agent may do, rule by rule: API group, resources, verbs.
const REVIEWED: &[(&str, &[&str], &[&str])] = &[
    // The cluster's workloads and services.
    (
        "",
        &["namespaces", "pods", "services"],
        &["get", "list", "watch"],
    ),
    // The `ambient.istio.io/redirection` annotation of captured pods.
    ("", &["pods"], &["patch"]),
    (
        "discovery.k8s.io",
        &["endpointslices"],
        &["get", "list", "watch"],
    ),
    (
        "security.istio.io",
        &["authorizationpolicies", "peerauthentications"],
        &["get", "list", "watch"],
    ),
    // kube-rs' event recorder creates events.k8s.io/v1 Events, then patches them as they repeat.
    ("events.k8s.io", &["events"], &["create", "patch"]),
];

/// A rule of a Role or ClusterRole, every field of `rbac.authorization.k8s.io/v1` PolicyRule: a
/// field this test does not know fails it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
}

/// One permission: a verb on a resource of an API group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {}/{}", self.verb, group, self.resource)
    }
}

/// A Kubernetes object of the manifests, as much of it as these checks read.
#[derive(Debug)]
struct Object {
    kind: String,
    name: String,
    value: Value,
}

impl Object {
    fn rules(&self) -> anyhow::Result<Vec<Rule>> {
        match self.value.get("rules") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(rules) => serde_yaml_ng::from_value(rules.clone())
                .with_context(|| format!("the rules of {} {}", self.kind, self.name)),
        }
    }

    fn is_role(&self) -> bool {
        matches!(self.kind.as_str(), "Role" | "ClusterRole")
    }
}

fn manifests() -> anyhow::Result<Vec<Object>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset/manifests/ambit.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        let kind = field("kind").context("an object without a kind")?;
        let name = value
            .get("metadata")
            .and_then(|metadata| metadata.get("name"))
            .and_then(Value::as_str)
            .with_context(|| format!("a {kind} without a name"))?
            .to_owned();
        objects.push(Object { kind, name, value });
    }
    Ok(objects)
}

/// What a role must never do: wildcards, Secrets, aggregation.
fn violations(role: &Object) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    if role.value.get("aggregationRule").is_some() {
        found.push("has an aggregationRule: it would grant what other roles' labels say".into());
    }
    for (index, rule) in role.rules()?.iter().enumerate() {
        for (field, values) in [
            ("apiGroups", &rule.api_groups),
            ("resources", &rule.resources),
            ("verbs", &rule.verbs),
            ("resourceNames", &rule.resource_names),
            ("nonResourceURLs", &rule.non_resource_urls),
        ] {
            for value in values.iter().filter(|value| value.contains('*')) {
                found.push(format!("rule {index}: wildcard {value:?} in {field}"));
            }
        }
        for resource in &rule.resources {
            if resource == "secrets" || resource.starts_with("secrets/") {
                found.push(format!("rule {index}: names {resource:?}"));
            }
        }
        if !rule.non_resource_urls.is_empty() {
            found.push(format!("rule {index}: nonResourceURLs"));
        }
    }
    Ok(found)
}

fn grants(rules: &[Rule]) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in rules {
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    grants.insert(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                    });
                }
            }
        }
    }
    grants
}

fn reviewed() -> BTreeSet<Grant> {
    let rules: Vec<Rule> = REVIEWED
        .iter()
        .map(|(group, resources, verbs)| Rule {
            api_groups: vec![(*group).to_owned()],
            resources: resources.iter().map(|r| (*r).to_owned()).collect(),
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
            resource_names: Vec::new(),
            non_resource_urls: Vec::new(),
        })
        .collect();
    grants(&rules)
}

#[test]
fn no_role_has_a_wildcard_or_touches_secrets() -> anyhow::Result<()> {
    let objects = manifests()?;
    let roles: Vec<&Object> = objects.iter().filter(|o| o.is_role()).collect();
    ensure!(
        !roles.is_empty(),
        "the manifests define no Role or ClusterRole"
    );
    let mut found = Vec::new();
    for role in roles {
        for violation in violations(role)? {
            found.push(format!("{} {}: {violation}", role.kind, role.name));
        }
    }
    ensure!(found.is_empty(), "least privilege:\n{}", found.join("\n"));
    Ok(())
}

#[test]
fn the_cluster_role_grants_exactly_the_reviewed_permissions() -> anyhow::Result<()> {
    let objects = manifests()?;
    let roles: Vec<&Object> = objects.iter().filter(|o| o.is_role()).collect();
    let [role] = roles.as_slice() else {
        bail!("expected one ClusterRole, found {} roles", roles.len());
    };
    ensure!(
        role.kind == "ClusterRole",
        "{} {} is not a ClusterRole",
        role.kind,
        role.name
    );
    for rule in role.rules()? {
        ensure!(
            rule.resource_names.is_empty(),
            "resourceNames are not part of the reviewed list: {rule:?}"
        );
    }
    let granted = grants(&role.rules()?);
    let reviewed = reviewed();
    let added: Vec<String> = granted
        .difference(&reviewed)
        .map(Grant::to_string)
        .collect();
    let missing: Vec<String> = reviewed
        .difference(&granted)
        .map(Grant::to_string)
        .collect();
    ensure!(
        added.is_empty() && missing.is_empty(),
        "ClusterRole {} differs from the reviewed permissions (REVIEWED in this file):\n\
         granted but not reviewed: {added:?}\nreviewed but not granted: {missing:?}",
        role.name
    );
    Ok(())
}

#[test]
fn bindings_grant_only_the_roles_of_the_manifests() -> anyhow::Result<()> {
    let objects = manifests()?;
    let roles: BTreeSet<(&str, &str)> = objects
        .iter()
        .filter(|o| o.is_role())
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    let accounts: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o.kind == "ServiceAccount")
        .map(|o| o.name.as_str())
        .collect();
    let bindings: Vec<&Object> = objects
        .iter()
        .filter(|o| matches!(o.kind.as_str(), "RoleBinding" | "ClusterRoleBinding"))
        .collect();
    ensure!(!bindings.is_empty(), "the manifests bind no role");
    for binding in bindings {
        let role_ref = binding
            .value
            .get("roleRef")
            .context("a binding without roleRef")?;
        let field = |name: &str| {
            role_ref
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        ensure!(
            roles.contains(&(field("kind"), field("name"))),
            "{} {} binds {} {}, which the manifests do not define",
            binding.kind,
            binding.name,
            field("kind"),
            field("name")
        );
        let subjects = binding.value.get("subjects").and_then(Value::as_sequence);
        for subject in subjects.into_iter().flatten() {
            let field = |name: &str| {
                subject
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            };
            ensure!(
                field("kind") == "ServiceAccount" && accounts.contains(field("name")),
                "{} {} binds {subject:?}, not the agent's service account",
                binding.kind,
                binding.name
            );
        }
    }
    Ok(())
}

/// The checks themselves, on a role that breaks every rule.
#[test]
fn the_checks_catch_wildcards_and_secrets() -> anyhow::Result<()> {
    let roles = parse(
        r#"
kind: ClusterRole
metadata: {name: greedy}
rules:
  - apiGroups: ["*"]
    resources: [pods]
    verbs: [get]
  - apiGroups: [""]
    resources: [secrets]
    verbs: ["*"]
  - apiGroups: [apps]
    resources: [deployments]
    resourceNames: ["*"]
    verbs: [get]
  - nonResourceURLs: ["/metrics*"]
    verbs: [get]
---
kind: ClusterRole
metadata: {name: aggregated}
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {rbac.example.com/aggregate: "true"}}]
"#,
    )?;
    let found: Vec<Vec<String>> = roles.iter().map(violations).collect::<Result<_, _>>()?;
    let greedy = found[0].join("\n");
    for expected in [
        r#"wildcard "*" in apiGroups"#,
        r#"wildcard "*" in verbs"#,
        r#"names "secrets""#,
        r#"wildcard "*" in resourceNames"#,
        r#"wildcard "/metrics*" in nonResourceURLs"#,
    ] {
        ensure!(greedy.contains(expected), "missed {expected}: {greedy}");
    }
    ensure!(found[1].len() == 1 && found[1][0].contains("aggregationRule"));
    ensure!(
        parse(
            "kind: ClusterRole\nmetadata: {name: typo}\nrules: [{apiGroup: ['*'], verbs: [get]}]"
        )?[0]
            .rules()
            .is_err(),
        "a misspelt field must not hide a wildcard"
    );
    Ok(())
}
