//! The objects, their versions and a bounded history of changes: the fake's etcd and watch
//! cache in one, without I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use serde_json::{Value, json};

use super::resources::ResourceId;

/// A `metadata.resourceVersion`: one counter over all objects.
pub(super) type Version = u64;

/// What names an object: its resource, namespace (empty when cluster-scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ObjectKey {
    pub(super) resource: ResourceId,
    pub(super) namespace: String,
    pub(super) name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches replay it.
#[derive(Debug)]
pub(super) struct Event {
    pub(super) version: Version,
    pub(super) change: Change,
    pub(super) key: ObjectKey,
    /// The object after the change; for a deletion, its last state at the deletion's version.
    pub(super) object: Value,
    /// The object before the change, for watches whose selector it matched and for rolling
    /// lists back to an older version.
    pub(super) previous: Option<Value>,
}

/// The version a watch or paged list asked for is no longer (or not yet) in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooOld {
    /// The oldest version a watch may start from now.
    pub(super) oldest: Version,
}

/// A write the store refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteRefused {
    NotFound,
    AlreadyExists,
    /// The write named a `resourceVersion` other than the object's.
    Conflict,
}

/// Objects as stored: with metadata, without `kind` and `apiVersion` (the URL gives those).
#[derive(Debug)]
pub(super) struct Store {
    objects: BTreeMap<ObjectKey, Value>,
    latest: Version,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Every change after this version is in `history`.
    oldest_watchable: Version,
    /// The objects file as last loaded, which the next load is compared with.
    file: BTreeMap<ObjectKey, Value>,
    /// How many times each key was created, so that a recreated object gets a new uid.
    incarnations: HashMap<ObjectKey, u32>,
}

impl Store {
    /// An empty store whose first change gets version `after + 1`.
    pub(super) fn new(after: Version, history_limit: usize) -> Self {
        Self {
            objects: BTreeMap::new(),
            latest: after,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            oldest_watchable: after,
            file: BTreeMap::new(),
            incarnations: HashMap::new(),
        }
    }

    pub(super) fn latest(&self) -> Version {
        self.latest
    }

    /// Whether the server serves `resource`: custom resources only while their definition exists.
    pub(super) fn is_served(&self, resource: ResourceId) -> bool {
        resource.resource().definition.is_none_or(|name| {
            self.objects.contains_key(&ObjectKey {
                resource: ResourceId::CUSTOM_RESOURCE_DEFINITIONS,
                namespace: String::new(),
                name: name.to_owned(),
            })
        })
    }

    pub(super) fn object(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The objects of `resource` as they were at version `at` (at most [`Self::latest`]).
    pub(super) fn snapshot(
        &self,
        resource: ResourceId,
        at: Version,
    ) -> Result<BTreeMap<ObjectKey, Value>, TooOld> {
        if at < self.oldest_watchable {
            return Err(self.too_old());
        }
        let mut objects: BTreeMap<ObjectKey, Value> = self
            .objects
            .iter()
            .filter(|(key, _)| key.resource == resource)
            .map(|(key, object)| (key.clone(), object.clone()))
            .collect();
        let later = self.history.iter().rev().take_while(|e| e.version > at);
        for event in later.filter(|e| e.key.resource == resource) {
            match (&event.change, &event.previous) {
                (Change::Added, _) => {
                    objects.remove(&event.key);
                }
                (_, Some(previous)) => {
                    objects.insert(event.key.clone(), previous.clone());
                }
                (_, None) => {}
            }
        }
        Ok(objects)
    }

    /// The changes after version `after`, for a watch that has seen everything up to it.
    pub(super) fn events_after(&self, after: Version) -> Result<Vec<Arc<Event>>, TooOld> {
        if after < self.oldest_watchable || after > self.latest {
            return Err(self.too_old());
        }
        let first = self.history.partition_point(|e| e.version <= after);
        Ok(self.history.range(first..).cloned().collect())
    }

    pub(super) fn too_old(&self) -> TooOld {
        TooOld {
            oldest: self.oldest_watchable,
        }
    }

    /// Creates `object` under `key`.
    pub(super) fn create(&mut self, key: ObjectKey, object: Value) -> Result<Value, WriteRefused> {
        if self.objects.contains_key(&key) {
            return Err(WriteRefused::AlreadyExists);
        }
        Ok(self.put(key, object))
    }

    /// Replaces the object under `key` with `object`, which a patch derived from it.
    pub(super) fn update(&mut self, key: ObjectKey, object: Value) -> Result<Value, WriteRefused> {
        let Some(current) = self.objects.get(&key) else {
            return Err(WriteRefused::NotFound);
        };
        let requested = object["metadata"]["resourceVersion"].as_str();
        if requested.is_some_and(|v| Some(v) != current["metadata"]["resourceVersion"].as_str()) {
            return Err(WriteRefused::Conflict);
        }
        Ok(self.put(key, object))
    }

    pub(super) fn delete(&mut self, key: &ObjectKey) -> Result<Value, WriteRefused> {
        let previous = self.objects.remove(key).ok_or(WriteRefused::NotFound)?;
        self.latest += 1;
        let mut object = previous.clone();
        object["metadata"]["resourceVersion"] = json!(self.latest.to_string());
        self.record(Change::Deleted, key.clone(), object.clone(), Some(previous));
        Ok(object)
    }

    /// Loads a new version of the objects file: what changed in the file since the last load
    /// is added, replaced or deleted; objects whose file content did not change keep their live
    /// state. Returns how many objects changed.
    pub(super) fn load_file(&mut self, file: BTreeMap<ObjectKey, Value>) -> usize {
        let mut changes = 0;
        for (key, content) in &file {
            if self.file.get(key) != Some(content) {
                self.put(key.clone(), content.clone());
                changes += 1;
            }
        }
        let removed: Vec<ObjectKey> = self
            .file
            .keys()
            .filter(|key| !file.contains_key(*key))
            .cloned()
            .collect();
        for key in removed {
            // Already gone when a client deleted it.
            if self.delete(&key).is_ok() {
                changes += 1;
            }
        }
        self.file = file;
        changes
    }

    /// Forgets the history, so that every watch must relist; the next list has a new version.
    pub(super) fn compact(&mut self) {
        self.history.clear();
        self.latest += 1;
        self.oldest_watchable = self.latest;
    }

    /// Stores `object` under `key` with a new version and the metadata the server owns.
    fn put(&mut self, key: ObjectKey, mut object: Value) -> Value {
        self.latest += 1;
        let previous = self.objects.get(&key).cloned();
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(key.name);
        if key.resource.resource().namespaced {
            metadata["namespace"] = json!(key.namespace);
        }
        metadata["resourceVersion"] = json!(self.latest.to_string());
        let change = match &previous {
            Some(previous) => {
                for owned in ["uid", "creationTimestamp"] {
                    metadata[owned] = previous["metadata"][owned].clone();
                }
                let generation = previous["metadata"]["generation"].as_u64().unwrap_or(1);
                let respecified = desired_state(previous) != desired_state(&object);
                object["metadata"]["generation"] = json!(generation + u64::from(respecified));
                Change::Modified
            }
            None => {
                let incarnation = self.incarnations.entry(key.clone()).or_default();
                *incarnation += 1;
                if metadata["uid"].as_str().is_none() {
                    metadata["uid"] = json!(uid(&key, *incarnation));
                }
                if metadata["creationTimestamp"].as_str().is_none() {
                    metadata["creationTimestamp"] = json!(timestamp_now());
                }
                metadata["generation"] = json!(1);
                Change::Added
            }
        };
        self.objects.insert(key.clone(), object.clone());
        self.record(change, key, object.clone(), previous);
        object
    }

    fn record(&mut self, change: Change, key: ObjectKey, object: Value, previous: Option<Value>) {
        self.history.push_back(Arc::new(Event {
            version: self.latest,
            change,
            key,
            object,
            previous,
        }));
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_watchable = dropped.version;
            }
        }
    }
}

/// What `metadata.generation` counts changes of: everything but metadata and status.
fn desired_state(object: &Value) -> Value {
    let mut state = object.clone();
    if let Some(fields) = state.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    state
}

/// A uid that stays the same for the same object across restarts of the server.
fn uid(key: &ObjectKey, incarnation: u32) -> String {
    let half = |salt: u8| {
        // `DefaultHasher::new` has fixed keys: the same binary gives the same hash every run.
        let mut hasher = DefaultHasher::new();
        (salt, key, incarnation).hash(&mut hasher);
        hasher.finish()
    };
    let bits = (u128::from(half(1)) << 64) | u128::from(half(2));
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Now, as `metadata.creationTimestamp` spells it.
pub(super) fn timestamp_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests;
