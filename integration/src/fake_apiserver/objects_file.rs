//! The objects file: multi-document YAML of ordinary Kubernetes objects (a `kind: List` is
//! expanded), parsed into what the store keeps.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::resources::ResourceId;
use super::store::ObjectKey;

#[derive(Debug, thiserror::Error)]
pub enum ObjectsFileError {
    #[error("document {document} is not valid YAML")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {document}: {problem}")]
    Object { document: usize, problem: String },
    #[error("document {document}: {kind} {namespace}/{name} is already in the file")]
    Duplicate {
        document: usize,
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

/// Parses the file's text into objects by key, as the store keeps them.
pub(super) fn parse(text: &str) -> Result<BTreeMap<ObjectKey, Value>, ObjectsFileError> {
    let mut objects = BTreeMap::new();
    for (index, yaml) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = index + 1;
        let value = Value::deserialize(yaml)
            .map_err(|source| ObjectsFileError::Yaml { document, source })?;
        let items = match value {
            Value::Null => Vec::new(),
            Value::Object(ref fields) if fields.get("kind") == Some(&"List".into()) => {
                match fields.get("items") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                }
            }
            value => vec![value],
        };
        for item in items {
            let (key, object) = stored_object(item)
                .map_err(|problem| ObjectsFileError::Object { document, problem })?;
            if objects.contains_key(&key) {
                return Err(ObjectsFileError::Duplicate {
                    document,
                    kind: key.resource.resource().kind,
                    namespace: key.namespace,
                    name: key.name,
                });
            }
            objects.insert(key, object);
        }
    }
    Ok(objects)
}

/// The key of `object` and the object as stored: without `kind`, `apiVersion` and the
/// metadata the server owns, and in namespace `default` when a namespaced object names none.
fn stored_object(mut object: Value) -> Result<(ObjectKey, Value), String> {
    let Some(fields) = object.as_object_mut() else {
        return Err("not an object".into());
    };
    let text = |value: Option<Value>, field: &str| match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(format!("{field} is missing or not a string")),
    };
    let api_version = text(fields.remove("apiVersion"), "apiVersion")?;
    let kind = text(fields.remove("kind"), "kind")?;
    let resource = ResourceId::by_kind(&api_version, &kind)
        .filter(|id| id.resource().is_stored())
        .ok_or_else(|| format!("{kind} of {api_version} is not served by this fake"))?;
    let Some(metadata) = fields.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Err("metadata is missing".into());
    };
    let name = text(metadata.get("name").cloned(), "metadata.name")?;
    metadata.remove("resourceVersion");
    let namespace = if resource.resource().namespaced {
        let namespace = match metadata.get("namespace") {
            Some(Value::String(ns)) if !ns.is_empty() => ns.clone(),
            _ => "default".to_owned(),
        };
        metadata.insert("namespace".into(), namespace.clone().into());
        namespace
    } else {
        metadata.remove("namespace");
        String::new()
    };
    let key = ObjectKey {
        resource,
        namespace,
        name,
    };
    Ok((key, object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> BTreeMap<ObjectKey, Value> {
        match parse(text) {
            Ok(objects) => objects,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn documents_and_lists_become_stored_objects() {
        let objects = parsed(
            "---
apiVersion: v1
kind: Namespace
metadata: {name: shop, namespace: ignored}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, resourceVersion: '7'}
  spec: {nodeName: n1}
",
        );
        let keys: Vec<(&str, &str, &str)> = objects
            .keys()
            .map(|k| {
                (
                    k.resource.resource().kind,
                    k.namespace.as_str(),
                    k.name.as_str(),
                )
            })
            .collect();
        assert_eq!(keys, [("Namespace", "", "shop"), ("Pod", "default", "web")]);
        let pod = objects.values().nth(1).cloned().unwrap_or_default();
        assert_eq!(
            pod,
            serde_json::json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"nodeName": "n1"}})
        );
    }

    #[test]
    fn bad_documents_are_named() {
        let duplicate = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default}\n";
        assert_eq!(
            parse(duplicate).map_err(|e| e.to_string()).err().as_deref(),
            Some("document 2: Pod default/a is already in the file")
        );
        for (text, message) in [
            (
                "kind: Pod\nmetadata: {name: a}",
                "document 1: apiVersion is missing or not a string",
            ),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}",
                "document 1: Deployment of apps/v1 is not served by this fake",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}",
                "document 1: metadata.name is missing or not a string",
            ),
            ("[1, 2]", "document 1: not an object"),
            ("a: [", "document 1 is not valid YAML"),
        ] {
            assert_eq!(
                parse(text).map_err(|e| e.to_string()).err().as_deref(),
                Some(message)
            );
        }
    }
}
