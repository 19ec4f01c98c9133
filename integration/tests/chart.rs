//! The RBAC of the programs the chart runs, as `daemonset/manifests/ambit.yaml` (the chart
//! rendered with its default values, kept equal to the chart by `scripts/validate-chart`) grants
//! it: no wildcard and nothing about Secrets in any Role or ClusterRole, no aggregated role,
//! bindings only to the roles and service accounts defined there, and each service account granted
//! exactly what the programs that run under it call, as listed in [`REVIEWED`], so that a new
//! permission is a reviewed change of that list: cluster-wide or in a namespace, on every object
//! or on the one a flag names. And the CA key: only the pods of `ambit ca` mount a Secret; the
//! agents sign nothing themselves. The Secret that `ambit ca` keeps a root it created in
//! (`ca.createRoot`, not the default) is checked by `scripts/chart-ca-wiring.py`. Needs no root.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use anyhow::{Context, ensure};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// A rule of what a program calls: API group, resources, verbs, where and on which objects.
#[derive(Debug)]
struct ReviewedRule {
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
    scope: Scope,
    objects: Objects,
}

/// Where a program calls.
#[derive(Debug)]
enum Scope {
    /// Across the cluster.
    Cluster,
    /// In the namespace a setting of the program names.
    Namespace(Setting),
}

/// Which objects a program calls on.
#[derive(Debug)]
enum Objects {
    All,
    /// Any, but only when a setting is set: a create, which names no object the API server
    /// could authorize it by.
    AllWith(Setting),
    /// The object a setting of the program names; the rule applies only when it is set.
    NamedBy(Setting),
}

/// A setting of a program: its flag, or the environment variable that sets it too.
#[derive(Debug, Clone, Copy)]
struct Setting {
    flag: &'static str,
    env: &'static str,
}

const fn cluster_wide(
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
) -> ReviewedRule {
    ReviewedRule {
        group,
        resources,
        verbs,
        scope: Scope::Cluster,
        objects: Objects::All,
    }
}

/// What each program of the `ambit` image calls, by the subcommand a container runs (its first
/// argument). A pod's service account must be granted exactly the union of its containers' lists.
const REVIEWED: &[(&str, &[ReviewedRule])] = &[("agent", AGENT), ("cni", CNI_INSTALL), ("ca", CA)];

/// `ambit agent`.
const AGENT: &[ReviewedRule] = &[
    // The cluster's workloads and services.
    cluster_wide(
        "",
        &["namespaces", "pods", "services"],
        &["get", "list", "watch"],
    ),
    // Nodes' topology labels, for the locality labels of Istio's metrics.
    cluster_wide("", &["nodes"], &["list", "watch"]),
    // The `ambient.istio.io/redirection` annotation of captured pods.
    cluster_wide("", &["pods"], &["patch"]),
    cluster_wide(
        "discovery.k8s.io",
        &["endpointslices"],
        &["get", "list", "watch"],
    ),
    cluster_wide(
        "security.istio.io",
        &["authorizationpolicies", "peerauthentications"],
        &["get", "list", "watch"],
    ),
    // ServiceEntries: egress and the DNS proxy's answers.
    cluster_wide(
        "networking.istio.io",
        &["serviceentries"],
        &["get", "list", "watch"],
    ),
    // kube-rs' event recorder creates events.k8s.io/v1 Events, then patches them as they repeat.
    cluster_wide("events.k8s.io", &["events"], &["create", "patch"]),
];

/// `ambit cni install --kubeconfig-from-service-account`: the kubeconfig it writes lets the plugin
/// read the pod being started and its namespace, with the agent's account.
const CNI_INSTALL: &[ReviewedRule] = &[cluster_wide("", &["namespaces", "pods"], &["get"])];

/// Where `ambit ca` keeps its objects (`--namespace`).
const CA_NAMESPACE: Setting = Setting {
    flag: "--namespace",
    env: "AMBIT_CA_NAMESPACE",
};

/// `ambit ca`: a TokenReview of each caller's token; for a node agent, a GET of the agent's pod
/// (named in its token) and a LIST of the pods of that pod's node (field selector
/// `spec.nodeName`). In its namespace, the roots ConfigMap: a GET to compare, a merge PATCH or,
/// when it is absent, a CREATE (`ca/src/server/root_publisher.rs`); with `--root-secret`, a GET
/// of the Secret and, when it is absent, a CREATE (`ca/src/server/root_secret.rs`).
const CA: &[ReviewedRule] = &[
    cluster_wide("authentication.k8s.io", &["tokenreviews"], &["create"]),
    cluster_wide("", &["pods"], &["get", "list"]),
    ReviewedRule {
        group: "",
        resources: &["configmaps"],
        verbs: &["get", "patch"],
        scope: Scope::Namespace(CA_NAMESPACE),
        objects: Objects::NamedBy(ROOT_CONFIGMAP),
    },
    ReviewedRule {
        group: "",
        resources: &["configmaps"],
        verbs: &["create"],
        scope: Scope::Namespace(CA_NAMESPACE),
        objects: Objects::AllWith(ROOT_CONFIGMAP),
    },
    ReviewedRule {
        group: "",
        resources: &["secrets"],
        verbs: &["get"],
        scope: Scope::Namespace(CA_NAMESPACE),
        objects: Objects::NamedBy(ROOT_SECRET),
    },
    ReviewedRule {
        group: "",
        resources: &["secrets"],
        verbs: &["create"],
        scope: Scope::Namespace(CA_NAMESPACE),
        objects: Objects::AllWith(ROOT_SECRET),
    },
];

/// The ConfigMap `ambit ca` publishes its roots in.
const ROOT_CONFIGMAP: Setting = Setting {
    flag: "--root-configmap",
    env: "AMBIT_CA_ROOT_CONFIGMAP",
};

/// The Secret `ambit ca` keeps a root it created in.
const ROOT_SECRET: Setting = Setting {
    flag: "--root-secret",
    env: "AMBIT_CA_ROOT_SECRET",
};

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

/// One permission: a verb on a resource of an API group, across the cluster or in a namespace,
/// on every object or on one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    namespace: Option<String>,
    group: String,
    resource: String,
    name: Option<String>,
    verb: String,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {}/{}", self.verb, group, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, "/{name}")?;
        }
        if let Some(namespace) = &self.namespace {
            write!(f, " in {namespace}")?;
        }
        Ok(())
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

    fn namespace(&self) -> &str {
        self.value
            .get("metadata")
            .and_then(|metadata| metadata.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The pod template of a workload (DaemonSet, Deployment, ...), if this is one.
    fn pod(&self) -> Option<&Value> {
        self.value.get("spec")?.get("template")?.get("spec")
    }
}

/// A workload of the manifests: what runs, and as whom.
#[derive(Debug)]
struct Workload<'a> {
    object: &'a Object,
    /// `namespace/name` of its service account.
    account: String,
    /// The first argument of each container: the `ambit` subcommand it runs.
    programs: Vec<String>,
    /// The containers, in the order of `programs`.
    containers: Vec<&'a Value>,
    pod: &'a Value,
}

fn workloads(objects: &[Object]) -> anyhow::Result<Vec<Workload<'_>>> {
    let mut found = Vec::new();
    for object in objects {
        let Some(pod) = object.pod() else { continue };
        let account = pod
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .with_context(|| format!("{} {} names no service account", object.kind, object.name))?;
        let mut programs = Vec::new();
        let mut containers = Vec::new();
        for container in sequence(pod, "initContainers").chain(sequence(pod, "containers")) {
            let program = container
                .get("args")
                .and_then(|args| args.get(0))
                .and_then(Value::as_str)
                .with_context(|| {
                    format!(
                        "a container of {} {} without args",
                        object.kind, object.name
                    )
                })?;
            programs.push(program.to_owned());
            containers.push(container);
        }
        found.push(Workload {
            object,
            account: format!("{}/{account}", object.namespace()),
            programs,
            containers,
            pod,
        });
    }
    Ok(found)
}

/// The value a container gives `setting`: its flag's argument, or its environment variable's
/// value, the downward API's `metadata.namespace` being `namespace`.
fn setting_of(
    container: &Value,
    setting: Setting,
    namespace: &str,
) -> anyhow::Result<Option<String>> {
    let args: Vec<&str> = sequence(container, "args")
        .filter_map(Value::as_str)
        .collect();
    for (index, arg) in args.iter().enumerate() {
        if *arg == setting.flag {
            let value = args.get(index + 1).context(setting.flag)?;
            return Ok(Some((*value).to_owned()));
        }
        if let Some(value) = arg
            .strip_prefix(setting.flag)
            .and_then(|v| v.strip_prefix('='))
        {
            return Ok(Some(value.to_owned()));
        }
    }
    let Some(env) = sequence(container, "env")
        .find(|env| env.get("name").and_then(Value::as_str) == Some(setting.env))
    else {
        return Ok(None);
    };
    if let Some(value) = env.get("value").and_then(Value::as_str) {
        return Ok(Some(value.to_owned()));
    }
    let field = env
        .get("valueFrom")
        .and_then(|from| from.get("fieldRef"))
        .and_then(|field| field.get("fieldPath"))
        .and_then(Value::as_str);
    ensure!(
        field == Some("metadata.namespace"),
        "{} is set from {env:?}, which this test cannot resolve",
        setting.env
    );
    Ok(Some(namespace.to_owned()))
}

fn sequence<'a>(value: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(field)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

fn name_of(value: &Value, field: &str) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned()
}

/// The Secrets a pod mounts: `secret` volumes and the Secret sources of projected volumes.
fn secrets(pod: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for volume in sequence(pod, "volumes") {
        if let Some(secret) = volume.get("secret") {
            found.push(name_of(secret, "secretName"));
        }
        let sources = volume
            .get("projected")
            .map(|projected| sequence(projected, "sources"));
        for source in sources.into_iter().flatten() {
            if let Some(secret) = source.get("secret") {
                found.push(name_of(secret, "name"));
            }
        }
    }
    found
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

/// What `rules` grant, across the cluster or in `namespace`.
fn grants(rules: &[Rule], namespace: Option<&str>) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in rules {
        let names = if rule.resource_names.is_empty() {
            vec![None]
        } else {
            rule.resource_names.iter().cloned().map(Some).collect()
        };
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for name in &names {
                    for verb in &rule.verbs {
                        grants.insert(Grant {
                            namespace: namespace.map(str::to_owned),
                            group: group.clone(),
                            resource: resource.clone(),
                            name: name.clone(),
                            verb: verb.clone(),
                        });
                    }
                }
            }
        }
    }
    grants
}

/// What `program` calls when run as `container` in `namespace`.
fn reviewed(program: &str, container: &Value, namespace: &str) -> anyhow::Result<BTreeSet<Grant>> {
    let (_, rules) = REVIEWED
        .iter()
        .find(|(name, _)| *name == program)
        .with_context(|| format!("`ambit {program}` has no reviewed permissions in REVIEWED"))?;
    let mut reviewed = BTreeSet::new();
    for rule in rules.iter() {
        let name = match rule.objects {
            Objects::All => None,
            Objects::AllWith(setting) => match setting_of(container, setting, namespace)? {
                Some(_) => None,
                None => continue,
            },
            Objects::NamedBy(setting) => match setting_of(container, setting, namespace)? {
                Some(name) => Some(name),
                None => continue,
            },
        };
        let scope = match rule.scope {
            Scope::Cluster => None,
            Scope::Namespace(setting) => {
                Some(setting_of(container, setting, namespace)?.with_context(|| {
                    format!(
                        "`ambit {program}` calls in the namespace {} names, which is not set",
                        setting.flag
                    )
                })?)
            }
        };
        for resource in rule.resources {
            for verb in rule.verbs {
                reviewed.insert(Grant {
                    namespace: scope.clone(),
                    group: rule.group.to_owned(),
                    resource: (*resource).to_owned(),
                    name: name.clone(),
                    verb: (*verb).to_owned(),
                });
            }
        }
    }
    Ok(reviewed)
}

/// What the bindings of the manifests grant `account` (`namespace/name`).
fn granted(objects: &[Object], account: &str) -> anyhow::Result<BTreeSet<Grant>> {
    let mut granted = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| matches!(o.kind.as_str(), "RoleBinding" | "ClusterRoleBinding"))
    {
        let binds_account = sequence(&binding.value, "subjects").any(|subject| {
            let field = |name: &str| subject.get(name).and_then(Value::as_str);
            field("kind") == Some("ServiceAccount")
                && format!(
                    "{}/{}",
                    field("namespace").unwrap_or_default(),
                    field("name").unwrap_or_default()
                ) == account
        });
        if !binds_account {
            continue;
        }
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
        let role = objects
            .iter()
            .find(|o| {
                o.kind == field("kind")
                    && o.name == field("name")
                    && (o.kind == "ClusterRole" || o.namespace() == binding.namespace())
            })
            .with_context(|| {
                format!(
                    "{} {} binds a role the manifests do not define in its namespace",
                    binding.kind, binding.name
                )
            })?;
        // A RoleBinding grants in its namespace, whichever kind of role it binds.
        let namespace = (binding.kind == "RoleBinding").then(|| binding.namespace());
        granted.extend(grants(&role.rules()?, namespace));
    }
    Ok(granted)
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
fn each_account_is_granted_exactly_what_its_programs_call() -> anyhow::Result<()> {
    let objects = manifests()?;
    let workloads = workloads(&objects)?;
    let mut programs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut reviewed_of: BTreeMap<&str, BTreeSet<Grant>> = BTreeMap::new();
    for workload in &workloads {
        programs
            .entry(workload.account.as_str())
            .or_default()
            .extend(workload.programs.iter().cloned());
        let account_reviewed = reviewed_of.entry(workload.account.as_str()).or_default();
        for (program, container) in workload.programs.iter().zip(&workload.containers) {
            account_reviewed.extend(reviewed(program, container, workload.object.namespace())?);
        }
    }
    let run: BTreeSet<&String> = programs.values().flatten().collect();
    for expected in ["agent", "cni", "ca"] {
        ensure!(
            run.iter().any(|program| *program == expected),
            "the manifests run no `ambit {expected}`: {run:?}"
        );
    }
    let mut found = Vec::new();
    for (account, programs) in &programs {
        let granted = granted(&objects, account)?;
        let reviewed = &reviewed_of[account];
        let added: Vec<String> = granted.difference(reviewed).map(Grant::to_string).collect();
        let missing: Vec<String> = reviewed
            .difference(&granted)
            .map(Grant::to_string)
            .collect();
        if !added.is_empty() || !missing.is_empty() {
            found.push(format!(
                "{account} (runs {programs:?}):\n  granted but not reviewed: {added:?}\n  \
                 reviewed but not granted: {missing:?}"
            ));
        }
    }
    ensure!(
        found.is_empty(),
        "accounts granted other than what their programs call (REVIEWED in this file):\n{}",
        found.join("\n")
    );
    Ok(())
}

#[test]
fn only_the_ca_mounts_a_secret() -> anyhow::Result<()> {
    let objects = manifests()?;
    let workloads = workloads(&objects)?;
    let mut ca = Vec::new();
    for workload in &workloads {
        let secrets = secrets(workload.pod);
        let name = format!("{} {}", workload.object.kind, workload.object.name);
        if workload.programs.iter().all(|program| program == "ca") {
            ca.push(name);
            continue;
        }
        ensure!(
            secrets.is_empty(),
            "{name} runs {:?} and mounts Secrets {secrets:?}",
            workload.programs
        );
        for container in sequence(workload.pod, "containers") {
            ensure!(
                !sequence(container, "args").any(|arg| arg.as_str() == Some("--ca-dir")),
                "{name} signs certificates with a CA key of its own (--ca-dir)"
            );
        }
    }
    ensure!(
        ca.len() == 1,
        "expected one workload of `ambit ca`, found {ca:?}"
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
    // Each bound account is one a workload of the manifests runs as, whose grants
    // each_account_is_granted_exactly_what_its_programs_call checks.
    let accounts: BTreeSet<String> = workloads(&objects)?
        .into_iter()
        .map(|workload| workload.account)
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
            let account = format!("{}/{}", field("namespace"), field("name"));
            ensure!(
                field("kind") == "ServiceAccount" && accounts.contains(&account),
                "{} {} binds {subject:?}, not an account a workload of the manifests runs as",
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

/// A setting is found as a flag, `--flag=value`, or its environment variable, the downward
/// API's namespace included; an unset one leaves its rules out.
#[test]
fn settings_come_from_flags_or_the_environment() -> anyhow::Result<()> {
    let container: Value = serde_yaml_ng::from_str(
        "
args: [ca, --root-configmap, roots, --root-secret=kept]
env:
  - {name: AMBIT_CA_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
",
    )?;
    let found = |setting| setting_of(&container, setting, "mesh");
    ensure!(found(ROOT_CONFIGMAP)?.as_deref() == Some("roots"));
    ensure!(found(ROOT_SECRET)?.as_deref() == Some("kept"));
    ensure!(found(CA_NAMESPACE)?.as_deref() == Some("mesh"));

    let calls = reviewed("ca", &container, "mesh")?;
    let secrets: Vec<String> = calls
        .iter()
        .filter(|grant| grant.resource == "secrets")
        .map(Grant::to_string)
        .collect();
    ensure!(
        secrets
            == [
                "create core/secrets in mesh",
                "get core/secrets/kept in mesh"
            ],
        "{secrets:?}"
    );
    let without: Value = serde_yaml_ng::from_str("args: [ca]")?;
    let calls = reviewed("ca", &without, "mesh")?;
    ensure!(
        calls.iter().all(|grant| grant.namespace.is_none()),
        "without --root-configmap the CA calls nothing in a namespace: {calls:?}"
    );
    Ok(())
}
