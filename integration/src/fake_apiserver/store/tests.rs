use super::*;

fn resource(api_version: &str, kind: &str) -> ResourceId {
    match ResourceId::by_kind(api_version, kind) {
        Some(id) => id,
        None => panic!("{api_version} {kind} is served"),
    }
}

fn pod_key(name: &str) -> ObjectKey {
    ObjectKey {
        resource: resource("v1", "Pod"),
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn pod(name: &str, node: &str) -> (ObjectKey, Value) {
    (
        pod_key(name),
        json!({"metadata": {"name": name, "namespace": "shop"}, "spec": {"nodeName": node}}),
    )
}

fn file(objects: impl IntoIterator<Item = (ObjectKey, Value)>) -> BTreeMap<ObjectKey, Value> {
    objects.into_iter().collect()
}

fn changes(store: &Store, after: Version) -> Vec<(Change, String)> {
    match store.events_after(after) {
        Ok(events) => events
            .iter()
            .map(|e| (e.change, e.key.name.clone()))
            .collect(),
        Err(e) => panic!("history from {after}: {e:?}"),
    }
}

#[test]
fn file_changes_become_added_modified_deleted() {
    let mut store = Store::new(100, 10);
    assert_eq!(store.load_file(file([pod("a", "n1"), pod("b", "n1")])), 2);
    assert_eq!(store.latest(), 102);
    let a = store.object(&pod_key("a")).cloned().unwrap_or_default();
    assert_eq!(a["metadata"]["resourceVersion"], "101");
    assert_eq!(a["metadata"]["generation"], 1);
    assert!(a["metadata"]["uid"].is_string());

    assert_eq!(store.load_file(file([pod("a", "n2"), pod("c", "n1")])), 3);
    assert_eq!(
        changes(&store, 102),
        [
            (Change::Modified, "a".into()),
            (Change::Added, "c".into()),
            (Change::Deleted, "b".into())
        ]
    );
    let a2 = store.object(&pod_key("a")).cloned().unwrap_or_default();
    assert_eq!(a2["metadata"]["uid"], a["metadata"]["uid"]);
    assert_eq!(a2["metadata"]["generation"], 2);
}

#[test]
fn live_changes_survive_an_unrelated_file_edit() {
    let mut store = Store::new(0, 10);
    store.load_file(file([pod("a", "n1"), pod("b", "n1")]));
    let mut patched = store.object(&pod_key("a")).cloned().unwrap_or_default();
    patched["metadata"]["annotations"] = json!({"k": "v"});
    assert!(store.update(pod_key("a"), patched).is_ok());

    store.load_file(file([pod("a", "n1"), pod("b", "n2")]));
    let a = store.object(&pod_key("a")).cloned().unwrap_or_default();
    assert_eq!(a["metadata"]["annotations"]["k"], "v");
}

#[test]
fn a_stale_resource_version_is_a_conflict() {
    let mut store = Store::new(0, 10);
    store.load_file(file([pod("a", "n1")]));
    let mut stale = store.object(&pod_key("a")).cloned().unwrap_or_default();
    stale["metadata"]["resourceVersion"] = json!("0");
    assert_eq!(
        store.update(pod_key("a"), stale),
        Err(WriteRefused::Conflict)
    );
    assert_eq!(
        store.create(pod("a", "n1").0, json!({})),
        Err(WriteRefused::AlreadyExists)
    );
    assert_eq!(
        store.update(pod_key("zz"), json!({})),
        Err(WriteRefused::NotFound)
    );
}

#[test]
fn snapshots_roll_back_to_older_versions() {
    let mut store = Store::new(0, 10);
    store.load_file(file([pod("a", "n1"), pod("b", "n1")]));
    let at = store.latest();
    store.load_file(file([pod("a", "n2"), pod("c", "n1")]));

    let pods = resource("v1", "Pod");
    let Ok(then) = store.snapshot(pods, at) else {
        panic!("{at} is in the history");
    };
    let names: Vec<&str> = then.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(then[&pod_key("a")]["spec"]["nodeName"], "n1");
    assert_eq!(then[&pod_key("a")]["metadata"]["resourceVersion"], "1");
}

#[test]
fn the_history_is_bounded_and_compaction_forgets_it() {
    let mut store = Store::new(0, 2);
    store.load_file(file([pod("a", "n1"), pod("b", "n1"), pod("c", "n1")]));
    assert_eq!(store.events_after(0).err(), Some(TooOld { oldest: 1 }));
    assert_eq!(changes(&store, 1).len(), 2);
    assert_eq!(store.events_after(4).err(), Some(TooOld { oldest: 1 }));

    store.compact();
    assert_eq!(store.latest(), 4);
    assert_eq!(store.events_after(3).err(), Some(TooOld { oldest: 4 }));
    assert_eq!(changes(&store, 4), []);
    assert!(store.snapshot(resource("v1", "Pod"), 3).is_err());
}

#[test]
fn custom_resources_are_served_while_their_definition_exists() {
    let mut store = Store::new(0, 10);
    let policies = resource("security.istio.io/v1", "AuthorizationPolicy");
    assert!(!store.is_served(policies));
    assert!(store.is_served(resource("v1", "Pod")));

    let crd = ObjectKey {
        resource: ResourceId::CUSTOM_RESOURCE_DEFINITIONS,
        namespace: String::new(),
        name: "authorizationpolicies.security.istio.io".into(),
    };
    store.load_file(file([(crd, json!({}))]));
    assert!(store.is_served(policies));
    assert!(!store.is_served(resource("security.istio.io/v1", "PeerAuthentication")));
}

#[test]
fn a_recreated_object_gets_a_new_uid() {
    let mut store = Store::new(0, 10);
    let uid = |store: &Store| {
        store
            .object(&pod_key("a"))
            .map(|a| a["metadata"]["uid"].clone())
    };
    store.load_file(file([pod("a", "n1")]));
    let first = uid(&store);
    store.load_file(file([]));
    assert_eq!(uid(&store), None);
    store.load_file(file([pod("a", "n1")]));
    assert!(uid(&store).is_some());
    assert_ne!(uid(&store), first);
}
