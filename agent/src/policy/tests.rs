//! Conformance of the engine to Istio's L4 semantics: policy sets and connection attributes in,
//! decision and deciding policy out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_identity::Identity;
use serde::Deserialize;

use super::compile::{self, CompileError};
use super::model;
use super::*;

const ROOT: &str = "istio-system";
const DESTINATION_IP: &str = "10.0.2.10";

/// Who connects: an identity (namespace, service account) or plaintext, from an IP.
#[derive(Clone, Copy)]
struct From {
    identity: Option<(&'static str, &'static str)>,
    ip: &'static str,
}

const FRONTEND: From = From {
    identity: Some(("shop", "frontend")),
    ip: "10.0.1.10",
};
const ADMIN: From = From {
    identity: Some(("ops", "admin")),
    ip: "10.0.3.7",
};
const PLAINTEXT: From = From {
    identity: None,
    ip: "192.168.5.5",
};

struct Case {
    name: &'static str,
    policies: &'static str,
    from: From,
    port: u16,
    /// Allowed, and the deciding policy.
    expect: (bool, Option<&'static str>),
}

/// Parses the documents of `yaml` as `M`, through JSON as the sources do, and compiles each with
/// `compile`.
fn compile_all<M, T>(
    yaml: &str,
    compile: impl Fn(&M) -> Result<T, CompileError>,
) -> Result<Vec<T>, CompileError>
where
    M: for<'de> Deserialize<'de>,
{
    let mut compiled = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document).unwrap();
        if !value.is_null() {
            compiled.push(compile(&serde_json::from_value(value).unwrap())?);
        }
    }
    Ok(compiled)
}

/// Compiles a multi-document YAML of AuthorizationPolicies.
fn policies(yaml: &str) -> Result<AuthorizationPolicies, CompileError> {
    let compiled =
        compile_all::<model::AuthorizationPolicy, _>(yaml, compile::authorization_policy)?;
    Ok(AuthorizationPolicies::new(ROOT, compiled))
}

fn labels() -> BTreeMap<String, String> {
    [("app".to_owned(), "web".to_owned())].into()
}

fn decide(
    policies: &AuthorizationPolicies,
    from: From,
    port: u16,
) -> (bool, Option<String>, Decision<'_>) {
    let identity = from.identity.map(|(ns, sa)| {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .parse::<Identity>()
            .unwrap()
    });
    let labels = labels();
    let connection = Connection {
        source_ip: from.ip.parse().unwrap(),
        source_identity: identity.as_ref(),
        destination_ip: DESTINATION_IP.parse().unwrap(),
        destination_port: port,
        destination_namespace: "shop",
        destination_labels: &labels,
        destination_services: &["web".to_owned()],
        destination_waypoints: &[],
        request: None,
    };
    let decision = policies.decide(&connection);
    (
        decision.allowed,
        decision.policy.map(ToString::to_string),
        decision,
    )
}

/// One YAML document of `kind` `namespace/name` with `spec` (indented two spaces).
macro_rules! object {
    ($kind:literal, $ns:literal, $name:literal, $spec:literal) => {
        concat!(
            "---\napiVersion: security.istio.io/v1\nkind: ",
            $kind,
            "\nmetadata: {name: ",
            $name,
            ", namespace: ",
            $ns,
            "}\nspec:\n",
            $spec,
            "\n"
        )
    };
}

macro_rules! policy {
    ($ns:literal, $name:literal, $spec:literal) => {
        object!("AuthorizationPolicy", $ns, $name, $spec)
    };
}

const ALLOW_FRONTEND: &str = policy!(
    "shop",
    "allow-frontend",
    "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]"
);

fn cases() -> Vec<Case> {
    let c = |name, policies, from, port, expect| Case {
        name,
        policies,
        from,
        port,
        expect,
    };
    vec![
        // Scope
        c("no policy allows", "", FRONTEND, 8080, (true, None)),
        c(
            "empty ALLOW in the root namespace denies everything",
            policy!("istio-system", "deny-all", "  {}"),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "empty ALLOW in the namespace denies everything",
            policy!("shop", "deny-all", "  {}"),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "a policy of another namespace does not apply",
            policy!("other", "deny-all", "  {}"),
            FRONTEND,
            8080,
            (true, None),
        ),
        c(
            "selector matching the workload applies",
            policy!(
                "shop",
                "web",
                "  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/web")),
        ),
        c(
            "selector matching the workload denies others",
            policy!(
                "shop",
                "web",
                "  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "selector not matching does not apply",
            policy!("shop", "db", "  selector: {matchLabels: {app: db}}"),
            FRONTEND,
            8080,
            (true, None),
        ),
        c(
            "root-namespace selector applies in every namespace",
            policy!(
                "istio-system",
                "web",
                "  selector: {matchLabels: {app: web}}"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "root-namespace DENY applies everywhere",
            policy!(
                "istio-system",
                "no-admin",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
            ),
            ADMIN,
            8080,
            (false, Some("istio-system/no-admin")),
        ),
        // Actions
        c(
            "DENY with an empty rule denies everything",
            policy!("shop", "deny", "  action: DENY\n  rules: [{}]"),
            FRONTEND,
            8080,
            (false, Some("shop/deny")),
        ),
        c(
            "DENY without rules denies nothing",
            policy!("shop", "deny", "  action: DENY"),
            FRONTEND,
            8080,
            (true, None),
        ),
        c(
            "DENY wins over a matching ALLOW",
            &*Box::leak(
                format!(
                    "{ALLOW_FRONTEND}{}",
                    policy!(
                        "shop",
                        "deny",
                        "  action: DENY\n  rules: [{to: [{operation: {ports: ['8080']}}]}]"
                    )
                )
                .into_boxed_str(),
            ),
            FRONTEND,
            8080,
            (false, Some("shop/deny")),
        ),
        c(
            "any matching ALLOW allows",
            &*Box::leak(
                format!(
                    "{ALLOW_FRONTEND}{}",
                    policy!(
                        "shop",
                        "allow-admin",
                        "  rules: [{from: [{source: {namespaces: [ops]}}]}]"
                    )
                )
                .into_boxed_str(),
            ),
            ADMIN,
            8080,
            (true, Some("shop/allow-admin")),
        ),
        c(
            "AUDIT never denies",
            policy!("shop", "audit", "  action: AUDIT\n  rules: [{}]"),
            FRONTEND,
            8080,
            (true, None),
        ),
        // Principals
        c(
            "principal exact match",
            ALLOW_FRONTEND,
            FRONTEND,
            8080,
            (true, Some("shop/allow-frontend")),
        ),
        c(
            "principal exact mismatch",
            ALLOW_FRONTEND,
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "principal prefix",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/*]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/p")),
        ),
        c(
            "principal prefix mismatch",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/*]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "principal suffix",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {principals: ['*/sa/admin']}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/p")),
        ),
        c(
            "principal presence matches any identity",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {principals: ['*']}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/p")),
        ),
        c(
            "principal presence needs an identity",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {principals: ['*']}}]}]"
            ),
            PLAINTEXT,
            8080,
            (false, None),
        ),
        c(
            "principals never match plaintext",
            ALLOW_FRONTEND,
            PLAINTEXT,
            8080,
            (false, None),
        ),
        c(
            "notPrincipals excludes",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/ops/sa/admin]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "notPrincipals lets others in",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/ops/sa/admin]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/p")),
        ),
        c(
            "notPrincipals holds for plaintext",
            policy!(
                "shop",
                "p",
                "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/ops/sa/admin]}}]}]"
            ),
            PLAINTEXT,
            8080,
            (true, Some("shop/p")),
        ),
        c(
            "DENY notPrincipals denies everyone else",
            policy!(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/frontend]}}]}]"
            ),
            ADMIN,
            8080,
            (false, Some("shop/d")),
        ),
        // Namespaces
        c(
            "namespace exact",
            policy!(
                "shop",
                "n",
                "  rules: [{from: [{source: {namespaces: [shop]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/n")),
        ),
        c(
            "namespace mismatch",
            policy!(
                "shop",
                "n",
                "  rules: [{from: [{source: {namespaces: [shop]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "namespace prefix",
            policy!(
                "shop",
                "n",
                "  rules: [{from: [{source: {namespaces: ['op*']}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/n")),
        ),
        c(
            "namespaces never match plaintext",
            policy!(
                "shop",
                "n",
                "  rules: [{from: [{source: {namespaces: ['*']}}]}]"
            ),
            PLAINTEXT,
            8080,
            (false, None),
        ),
        c(
            "DENY by namespace",
            policy!(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
            ),
            ADMIN,
            8080,
            (false, Some("shop/d")),
        ),
        c(
            "DENY by namespace spares others",
            policy!(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, None),
        ),
        c(
            "notNamespaces",
            policy!(
                "shop",
                "n",
                "  rules: [{from: [{source: {notNamespaces: [ops]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        // IP blocks
        c(
            "ipBlocks contains the source",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: [10.0.1.0/24]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/i")),
        ),
        c(
            "ipBlocks does not contain the source",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: [10.0.1.0/24]}}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "ipBlocks single address",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: [10.0.3.7]}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/i")),
        ),
        c(
            "ipBlocks match plaintext too",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: [192.168.0.0/16]}}]}]"
            ),
            PLAINTEXT,
            8080,
            (true, Some("shop/i")),
        ),
        c(
            "notIpBlocks",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "remoteIpBlocks",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {remoteIpBlocks: [10.0.1.10/32]}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/i")),
        ),
        c(
            "notRemoteIpBlocks",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {notRemoteIpBlocks: [10.0.1.10/32]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "an IPv6 block never holds an IPv4 source",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: ['::/0']}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "a /0 block holds every IPv4 source",
            policy!(
                "shop",
                "i",
                "  rules: [{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/i")),
        ),
        // Ports
        c(
            "port match",
            policy!(
                "shop",
                "o",
                "  rules: [{to: [{operation: {ports: ['8080']}}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/o")),
        ),
        c(
            "port mismatch",
            policy!(
                "shop",
                "o",
                "  rules: [{to: [{operation: {ports: ['8080']}}]}]"
            ),
            FRONTEND,
            9090,
            (false, None),
        ),
        c(
            "notPorts",
            policy!(
                "shop",
                "o",
                "  rules: [{to: [{operation: {notPorts: ['9090']}}]}]"
            ),
            FRONTEND,
            9090,
            (false, None),
        ),
        c(
            "DENY by port",
            policy!(
                "shop",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {ports: ['9090']}}]}]"
            ),
            FRONTEND,
            9090,
            (false, Some("shop/d")),
        ),
        c(
            "DENY by port spares other ports",
            policy!(
                "shop",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {ports: ['9090']}}]}]"
            ),
            FRONTEND,
            8080,
            (true, None),
        ),
        // How fields combine
        c(
            "from and to must both hold",
            policy!(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ['9090']}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "any from entry holds",
            policy!(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [nope]}}, {source: {namespaces: [ops]}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/a")),
        ),
        c(
            "any rule holds",
            policy!(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [nope]}}]}, {to: [{operation: {ports: ['8080']}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/a")),
        ),
        c(
            "every field of a source holds",
            policy!(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [shop], ipBlocks: [10.9.0.0/16]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        // When
        c(
            "when source.ip",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: source.ip, values: [10.0.1.0/24]}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/w")),
        ),
        c(
            "when remote.ip",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: remote.ip, values: [10.0.3.7]}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "when source.namespace",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: source.namespace, values: [ops]}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/w")),
        ),
        c(
            "when source.principal",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: source.principal, values: ['*/sa/frontend']}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/w")),
        ),
        c(
            "when destination.ip",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: destination.ip, values: [10.0.2.0/24]}]}]"
            ),
            FRONTEND,
            8080,
            (true, Some("shop/w")),
        ),
        c(
            "when destination.port",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: destination.port, values: ['9090']}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "when notValues",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: source.namespace, notValues: [ops]}]}]"
            ),
            ADMIN,
            8080,
            (false, None),
        ),
        c(
            "every condition holds",
            policy!(
                "shop",
                "w",
                "  rules: [{when: [{key: source.namespace, values: [shop]}, {key: destination.port, values: ['9090']}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        // L7 attributes cannot be decided here
        c(
            "ALLOW with an L7 operation never matches",
            policy!(
                "shop",
                "l7",
                "  rules: [{to: [{operation: {methods: [GET]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "DENY with an L7 operation always matches",
            policy!(
                "shop",
                "l7",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [nope]}}], to: [{operation: {paths: [/admin]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, Some("shop/l7")),
        ),
        c(
            "ALLOW with a request condition never matches",
            policy!(
                "shop",
                "l7",
                "  rules: [{when: [{key: 'request.headers[x-user]', values: [me]}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "DENY with requestPrincipals always matches",
            policy!(
                "shop",
                "l7",
                "  action: DENY\n  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"
            ),
            FRONTEND,
            8080,
            (false, Some("shop/l7")),
        ),
        // targetRefs to a Service: enforced at its endpoints
        c(
            "targetRefs to a Service the destination backs",
            policy!(
                "shop",
                "t",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
            ),
            FRONTEND,
            8080,
            (false, None),
        ),
        c(
            "targetRefs to a Service the destination backs allows",
            policy!(
                "shop",
                "t",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
            ),
            ADMIN,
            8080,
            (true, Some("shop/t")),
        ),
        c(
            "targetRefs to another Service does not apply",
            policy!("shop", "t", "  targetRefs: [{kind: Service, name: db}]"),
            FRONTEND,
            8080,
            (true, None),
        ),
        // Dry run
        c(
            "a dry-run DENY does not deny",
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\nspec:\n  action: DENY\n  rules: [{}]\n",
            FRONTEND,
            8080,
            (true, None),
        ),
        c(
            "a dry-run ALLOW does not deny",
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\nspec: {}\n",
            FRONTEND,
            8080,
            (true, None),
        ),
    ]
}

#[test]
fn authorization_conformance() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for case in cases {
        let policies = policies(case.policies).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let (allowed, policy, _) = decide(&policies, case.from, case.port);
        assert_eq!((allowed, policy.as_deref()), case.expect, "{}", case.name);
    }
}

#[test]
fn audit_and_dry_run_are_reported() {
    let audit = policies(policy!(
        "shop",
        "audit",
        "  action: AUDIT\n  rules: [{from: [{source: {namespaces: [ops]}}]}]"
    ))
    .unwrap();
    let (_, _, decision) = decide(&audit, ADMIN, 8080);
    assert_eq!(
        decision.audit.map(ToString::to_string).as_deref(),
        Some("shop/audit")
    );
    let (_, _, decision) = decide(&audit, FRONTEND, 8080);
    assert_eq!(decision.audit, None);

    let dry = policies("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\nspec:\n  action: DENY\n  rules: [{}]\n").unwrap();
    let (allowed, _, decision) = decide(&dry, FRONTEND, 8080);
    assert!(allowed);
    assert_eq!(
        decision.dry_run_deny.map(ToString::to_string).as_deref(),
        Some("shop/d")
    );
}

fn peer_authentications(yaml: &str) -> PeerAuthentications {
    let compiled = compile_all::<model::PeerAuthentication, _>(yaml, compile::peer_authentication);
    PeerAuthentications::new(ROOT, compiled.unwrap())
}

macro_rules! peer {
    ($ns:literal, $name:literal, $spec:literal) => {
        object!("PeerAuthentication", $ns, $name, $spec)
    };
}

#[test]
fn peer_authentication_conformance() {
    let mesh_strict = peer!("istio-system", "default", "  mtls: {mode: STRICT}");
    let ns_permissive = peer!("shop", "default", "  mtls: {mode: PERMISSIVE}");
    let workload_strict = peer!(
        "shop",
        "web",
        "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {'9090': {mode: PERMISSIVE}}"
    );
    let cases: Vec<(&str, String, u16, MtlsMode)> = vec![
        (
            "default is PERMISSIVE",
            String::new(),
            8080,
            MtlsMode::Permissive,
        ),
        (
            "mesh-wide STRICT",
            mesh_strict.to_owned(),
            8080,
            MtlsMode::Strict,
        ),
        (
            "namespace overrides the mesh",
            format!("{mesh_strict}{ns_permissive}"),
            8080,
            MtlsMode::Permissive,
        ),
        (
            "workload overrides the namespace",
            format!("{ns_permissive}{workload_strict}"),
            8080,
            MtlsMode::Strict,
        ),
        (
            "a port exception under a STRICT workload",
            format!("{mesh_strict}{workload_strict}"),
            9090,
            MtlsMode::Permissive,
        ),
        (
            "UNSET inherits",
            format!(
                "{mesh_strict}{}",
                peer!("shop", "default", "  mtls: {mode: UNSET}")
            ),
            8080,
            MtlsMode::Strict,
        ),
        (
            "DISABLE",
            peer!("shop", "default", "  mtls: {mode: DISABLE}").to_owned(),
            8080,
            MtlsMode::Disable,
        ),
        (
            "a selector that does not match",
            format!(
                "{ns_permissive}{}",
                peer!(
                    "shop",
                    "db",
                    "  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}"
                )
            ),
            8080,
            MtlsMode::Permissive,
        ),
        (
            "another namespace does not apply",
            peer!("other", "default", "  mtls: {mode: STRICT}").to_owned(),
            8080,
            MtlsMode::Permissive,
        ),
    ];
    for (name, yaml, port, expected) in cases {
        let policies = peer_authentications(&yaml);
        assert_eq!(
            policies.decide("shop", &labels(), port).0,
            expected,
            "{name}"
        );
    }

    let deciding = |yaml: &str, port| {
        let policies = peer_authentications(yaml);
        let (_, policy) = policies.decide("shop", &labels(), port);
        policy.map(ToString::to_string)
    };
    assert_eq!(deciding("", 8080), None, "the default has no policy");
    assert_eq!(
        deciding(&format!("{mesh_strict}{workload_strict}"), 9090).as_deref(),
        Some("shop/web")
    );
    assert_eq!(
        deciding(mesh_strict, 8080).as_deref(),
        Some("istio-system/default")
    );
}

#[test]
fn bad_policies_are_refused_with_their_field() {
    let compile_error = |spec: &str| {
        let yaml = format!("metadata: {{name: bad, namespace: shop}}\nspec:\n{spec}\n");
        let policy: model::AuthorizationPolicy = serde_yaml_ng::from_str(&yaml).unwrap();
        compile::authorization_policy(&policy)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        compile_error("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]"),
        "field `spec.rules[0].from[0].source.ipBlocks[0]`: \"10.0.0.0/33\" is not an IP address or CIDR block"
    );
    assert!(
        compile_error("  rules: [{from: [{source: {principals: ['a*b']}}]}]")
            .starts_with("field `spec.rules[0].from[0].source.principals[0]`")
    );
    assert!(
        compile_error("  rules: [{from: [{source: {notNamespaces: ['']}}]}]")
            .starts_with("field `spec.rules[0].from[0].source.notNamespaces[0]`")
    );
    assert!(
        compile_error("  rules: [{when: [{key: source.user, values: [x]}]}]")
            .starts_with("field `spec.rules[0].when[0].key`: unknown condition key")
    );
    assert!(
        compile_error("  rules: [{to: [{operation: {ports: ['http']}}]}]")
            .starts_with("field `spec.rules[0].to[0].operation.ports[0]`")
    );
    assert!(compile_error("  action: CUSTOM").starts_with("field `spec.action`"));
    assert!(
        compile_error("  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}]")
            .starts_with("field `spec.targetRefs[0].kind`")
    );
    assert!(
        compile_error(
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}, {kind: Service, name: web}]"
        )
        .starts_with("field `spec.targetRefs`")
    );
    assert!(
        compile_error(
            "  selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Service, name: web}]"
        )
        .starts_with("field `spec.targetRefs`")
    );

    let unknown: Result<model::AuthorizationPolicy, _> = serde_yaml_ng::from_str(
        "metadata: {name: bad}\nspec:\n  rules: [{from: [{source: {principal: [x]}}]}]\n",
    );
    assert!(
        unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `principal`")
    );

    let peer: model::PeerAuthentication = serde_yaml_ng::from_str(
        "metadata: {name: bad, namespace: shop}\nspec:\n  portLevelMtls: {'80': {mode: STRICT}}\n",
    )
    .unwrap();
    assert!(
        compile::peer_authentication(&peer)
            .unwrap_err()
            .to_string()
            .starts_with("field `spec.portLevelMtls`")
    );
    for port in ["http", "0", "65536", "-1"] {
        let peer: model::PeerAuthentication = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {port: {"mode": "STRICT"}}},
        }))
        .unwrap();
        assert_eq!(
            compile::peer_authentication(&peer).unwrap_err().to_string(),
            format!("field `spec.portLevelMtls.{port}`: not a port")
        );
    }
}

#[test]
fn a_policy_that_does_not_compile_denies_its_scope() {
    let name = PolicyName {
        namespace: "shop".into(),
        name: "bad".into(),
    };
    let policies = AuthorizationPolicies::new(ROOT, [compile::deny_all(name, Scope::Namespace)]);
    let (allowed, policy, _) = decide(&policies, FRONTEND, 8080);
    assert!(!allowed);
    assert_eq!(policy.as_deref(), Some("shop/bad"));
}

#[test]
fn cidrs_contain_what_they_should() {
    let cidr = |s: &str| {
        let (ip, prefix) = s.split_once('/').unwrap();
        Cidr {
            network: ip.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.1")));
    assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
    assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
    assert!(cidr("fd00::/8").contains(ip("fd12::1")));
    assert!(!cidr("fd00::/8").contains(ip("10.0.0.1")));
    assert!(cidr("10.0.0.1/32").contains(ip("10.0.0.1")));
}

/// What the waypoint `shop/waypoint` decides for `method path` with `host` and `headers` from
/// the frontend, to the Service `shop/web`.
fn at_waypoint(
    policies: &AuthorizationPolicies,
    (method, path, host): (&str, &str, &str),
    headers: &[(&'static str, &'static str)],
) -> bool {
    let identity: Identity = "spiffe://cluster.local/ns/shop/sa/frontend"
        .parse()
        .unwrap();
    let mut header_map = http::HeaderMap::new();
    for (name, value) in headers {
        header_map.append(*name, http::HeaderValue::from_static(value));
    }
    let request = HttpRequest {
        method,
        path,
        host,
        headers: &header_map,
    };
    let no_labels = BTreeMap::new();
    let connection = Connection {
        source_ip: FRONTEND.ip.parse().unwrap(),
        source_identity: Some(&identity),
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: 80,
        destination_namespace: "shop",
        destination_labels: &no_labels,
        destination_services: &[],
        destination_waypoints: &[],
        request: Some(&request),
    };
    let waypoint = crate::state::WaypointRef {
        namespace: "shop".into(),
        name: "waypoint".into(),
    };
    policies
        .decide_at_waypoint(&waypoint, Some(("shop", "web")), &connection)
        .allowed
}

#[test]
fn waypoints_decide_http_fields_of_the_policies_that_target_them() {
    let policies = policies(concat!(
        object!(
            "AuthorizationPolicy",
            "shop",
            "reads",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  rules:\n  - to: [{operation: {methods: [GET], paths: [/api/*], hosts: [Web.Shop*]}}]\n    when: [{key: 'request.headers[x-team]', values: [blue, green*]}]"
        ),
        object!(
            "AuthorizationPolicy",
            "shop",
            "no-debug",
            "  targetRefs: [{kind: Service, name: web}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [/api/debug*]}}]}]"
        ),
        object!(
            "AuthorizationPolicy",
            "shop",
            "selected",
            "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]"
        ),
    ))
    .unwrap();
    let get = |path| ("GET", path, "web.shop.svc.cluster.local");
    assert!(
        at_waypoint(&policies, get("/api/items"), &[("x-team", "green-2")]),
        "a selector policy does not apply at a waypoint"
    );
    assert!(!at_waypoint(&policies, get("/api/items"), &[]), "no header");
    assert!(!at_waypoint(
        &policies,
        get("/api/items"),
        &[("x-team", "red")]
    ));
    assert!(!at_waypoint(
        &policies,
        ("POST", "/api/items", "web.shop"),
        &[("x-team", "blue")]
    ));
    assert!(
        at_waypoint(
            &policies,
            ("GET", "/api/x", "WEB.SHOP:80"),
            &[("x-team", "blue")]
        ),
        "hosts ignore case"
    );
    assert!(!at_waypoint(
        &policies,
        ("GET", "/api/x", "admin.shop"),
        &[("x-team", "blue")]
    ));
    assert!(
        !at_waypoint(&policies, get("/api/debug/vars"), &[("x-team", "blue")]),
        "the Service's DENY"
    );
    // Repeated headers count as one, joined: a DENY on a prefix cannot be dodged by repeating.
    let deny_header = policies_with_header_deny();
    assert!(!at_waypoint(
        &deny_header,
        get("/"),
        &[("x-role", "guest"), ("x-role", "admin")]
    ));
    assert!(at_waypoint(&deny_header, get("/"), &[("x-role", "guest")]));
}

fn policies_with_header_deny() -> AuthorizationPolicies {
    policies(object!(
        "AuthorizationPolicy",
        "shop",
        "no-admins",
        "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{when: [{key: 'request.headers[x-role]', values: ['*admin']}]}]"
    ))
    .unwrap()
}
