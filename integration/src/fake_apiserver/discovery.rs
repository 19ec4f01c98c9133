//! Discovery documents: `/version`, `/api`, `/apis`, `/apis/{group}` and the resource lists.
//! Custom resources appear only while the store serves them.

use serde_json::{Value, json};

use super::resources::{Resource, ResourceId};
use super::store::Store;

/// The Kubernetes version the fake claims to be.
const MINOR_VERSION: &str = "33";

pub(super) fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": MINOR_VERSION,
        "gitVersion": format!("v1.{MINOR_VERSION}.0-fake"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: the core group's versions.
pub(super) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `/apis`: every named group that serves at least one resource.
pub(super) fn groups(store: &Store) -> Value {
    let mut names: Vec<&str> = served(store)
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    let groups: Vec<Value> = names.into_iter().filter_map(|g| group(store, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{name}`, or `None` when the group serves nothing.
pub(super) fn group(store: &Store, name: &str) -> Option<Value> {
    let mut versions: Vec<&str> = Vec::new();
    let served_versions = served(store)
        .filter(|r| r.group == name)
        .flat_map(|r| r.versions.iter().copied());
    for version in served_versions {
        if !versions.contains(&version) {
            versions.push(version);
        }
    }
    let preferred = *versions.first()?;
    let version = |v: &str| json!({"groupVersion": format!("{name}/{v}"), "version": v});
    Some(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": versions.iter().map(|v| version(v)).collect::<Vec<_>>(),
        "preferredVersion": version(preferred),
    }))
}

/// `/api/v1` or `/apis/{group}/{version}`, or `None` when that version serves nothing.
pub(super) fn resources(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = served(store)
        .filter(|r| r.group == group && r.versions.contains(&version))
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": r.verbs,
            })
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") },
        "resources": resources,
    }))
}

fn served(store: &Store) -> impl Iterator<Item = &'static Resource> + '_ {
    ResourceId::all()
        .filter(|id| store.is_served(*id))
        .map(ResourceId::resource)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::store::ObjectKey;
    use super::*;

    fn group_names(store: &Store) -> Vec<String> {
        groups(store)["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str().map(str::to_owned))
            .collect()
    }

    #[test]
    fn istio_security_appears_with_its_definitions() {
        let mut store = Store::new(0, 10);
        assert!(!group_names(&store).contains(&"security.istio.io".to_owned()));
        assert!(resources(&store, "security.istio.io", "v1").is_none());
        assert!(resources(&store, "", "v1").is_some());

        let crd = ObjectKey {
            resource: ResourceId::CUSTOM_RESOURCE_DEFINITIONS,
            namespace: String::new(),
            name: "peerauthentications.security.istio.io".into(),
        };
        store.load_file(BTreeMap::from([(crd, json!({}))]));
        assert!(group_names(&store).contains(&"security.istio.io".to_owned()));
        let list = resources(&store, "security.istio.io", "v1beta1").unwrap_or_default();
        assert_eq!(list["resources"][0]["kind"], "PeerAuthentication");
        assert_eq!(list["resources"].as_array().map(Vec::len), Some(1));
        let group = group(&store, "security.istio.io").unwrap_or_default();
        assert_eq!(group["preferredVersion"]["version"], "v1");
    }
}
