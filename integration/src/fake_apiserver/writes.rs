//! Reading and writing single objects: get, create, patch and delete.

use serde_json::{Value, json};

use super::patch::{self, PatchType};
use super::query::Query;
use super::routes::Target;
use super::state::State;
use super::status::Refusal;
use super::store::{ObjectKey, Version, WriteRefused};

/// Characters of the suffix `metadata.generateName` gets, as the real server picks them.
const NAME_SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub(super) fn get(state: &State, target: &Target, name: &str) -> Result<Value, Refusal> {
    let key = key(target, name);
    let store = state.store();
    let object = store.object(&key).ok_or_else(|| not_found(target, name))?;
    Ok(target.typed(object))
}

/// Creates the object in `body` in the target's namespace.
pub(super) fn create(state: &State, target: &Target, body: &[u8]) -> Result<Value, Refusal> {
    let resource = target.resource.resource();
    let mut object: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad_request(format!("the body is not a JSON object: {e}")))?;
    if !object.is_object() {
        return Err(Refusal::bad_request("the body is not a JSON object"));
    }
    if let Some(kind) = object["kind"].as_str().filter(|k| *k != resource.kind) {
        return Err(Refusal::bad_request(format!(
            "the kind {kind:?} does not match the resource {}",
            resource.plural
        )));
    }
    let namespace = match (&target.namespace, object["metadata"]["namespace"].as_str()) {
        (Some(url), Some(body)) if url != body => {
            return Err(Refusal::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        (Some(url), _) => url.clone(),
        (None, _) if resource.namespaced => return Err(Refusal::method_not_allowed()),
        (None, _) => String::new(),
    };
    state.write(|store| {
        let name = match (
            object["metadata"]["name"].as_str(),
            object["metadata"]["generateName"].as_str(),
        ) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => generated_name(prefix, store.latest()),
            _ => {
                return Err(Refusal::invalid(format!(
                    "{} is invalid: metadata.name: Required value: name or generateName is required",
                    resource.kind
                )));
            }
        };
        object["metadata"]["name"] = json!(name);
        let key = ObjectKey {
            resource: target.resource,
            namespace,
            name,
        };
        let created = store
            .create(key.clone(), Target::untyped(object))
            .map_err(|refused| refusal(refused, target, &key.name))?;
        Ok(target.typed(&created))
    })
}

/// Applies the patch in `body`; server-side apply creates the object when it is missing.
pub(super) fn patch(
    state: &State,
    target: &Target,
    name: &str,
    content_type: &str,
    query: &Query,
    body: &[u8],
) -> Result<Value, Refusal> {
    let patch_type = PatchType::from_content_type(content_type)
        .ok_or_else(|| Refusal::unsupported_media_type(content_type))?;
    if patch_type == PatchType::Apply && query.field_manager.is_none() {
        return Err(Refusal::invalid(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let key = key(target, name);
    state.write(|store| {
        let current = match store.object(&key) {
            Some(current) => target.typed(current),
            None if patch_type == PatchType::Apply => {
                let mut metadata = json!({"name": name});
                if let Some(namespace) = &target.namespace {
                    metadata["namespace"] = json!(namespace);
                }
                target.typed(&json!({"metadata": metadata}))
            }
            None => return Err(not_found(target, name)),
        };
        let patched = patch::apply(patch_type, &current, body)
            .map_err(|e| Refusal::invalid(format!("{e}: {}", source_message(&e))))?;
        for field in ["name", "namespace"] {
            if patched["metadata"][field] != current["metadata"][field] {
                return Err(Refusal::bad_request(format!(
                    "metadata.{field} cannot be changed by a patch"
                )));
            }
        }
        let patched = Target::untyped(patched);
        let written = if store.object(&key).is_some() {
            store.update(key.clone(), patched)
        } else {
            store.create(key.clone(), patched)
        };
        let written = written.map_err(|refused| refusal(refused, target, name))?;
        Ok(target.typed(&written))
    })
}

pub(super) fn delete(state: &State, target: &Target, name: &str) -> Result<Value, Refusal> {
    let key = key(target, name);
    state.write(|store| {
        let deleted = store
            .delete(&key)
            .map_err(|refused| refusal(refused, target, name))?;
        Ok(target.typed(&deleted))
    })
}

fn key(target: &Target, name: &str) -> ObjectKey {
    ObjectKey {
        resource: target.resource,
        namespace: target.namespace.clone().unwrap_or_default(),
        name: name.to_owned(),
    }
}

fn not_found(target: &Target, name: &str) -> Refusal {
    Refusal::not_found(target.resource.resource(), name)
}

fn refusal(refused: WriteRefused, target: &Target, name: &str) -> Refusal {
    let resource = target.resource.resource();
    match refused {
        WriteRefused::NotFound => Refusal::not_found(resource, name),
        WriteRefused::AlreadyExists => Refusal::already_exists(resource, name),
        WriteRefused::Conflict => Refusal::conflict(resource, name),
    }
}

fn source_message(error: &dyn std::error::Error) -> String {
    error.source().map(ToString::to_string).unwrap_or_default()
}

/// `prefix` and five characters derived from `version`, which no earlier name used.
fn generated_name(prefix: &str, version: Version) -> String {
    let base = NAME_SUFFIX_ALPHABET.len() as u64;
    let mut rest = version;
    let suffix: String = (0..5)
        .map(|_| {
            let digit = NAME_SUFFIX_ALPHABET[(rest % base) as usize];
            rest /= base;
            char::from(digit)
        })
        .collect();
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_differ_by_version() {
        assert_ne!(generated_name("ev-", 1), generated_name("ev-", 2));
        assert!(generated_name("ev-", 1).starts_with("ev-"));
        assert_eq!(generated_name("ev-", 1).len(), 8);
    }
}
