//! PATCH bodies: JSON patch (RFC 6902), merge patch (RFC 7386), and strategic merge and
//! server-side apply, both applied as a merge of the fields they give.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PatchType {
    Json,
    Merge,
    /// Treated as a merge patch: its list directives are not interpreted.
    StrategicMerge,
    /// Server-side apply, treated as a merge patch without field ownership.
    Apply,
}

impl PatchType {
    /// The patch type a `Content-Type` names (parameters such as `charset` ignored).
    pub(super) fn from_content_type(content_type: &str) -> Option<Self> {
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        match media_type {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PatchError {
    #[error("the body is not a JSON patch")]
    ParseJsonPatch(#[source] serde_json::Error),
    #[error("the body is not a JSON object")]
    ParseJson(#[source] serde_json::Error),
    #[error("the body is not YAML")]
    ParseYaml(#[source] serde_yaml_ng::Error),
    #[error("the JSON patch does not apply")]
    ApplyJsonPatch(#[source] json_patch::PatchError),
    #[error("the patched object is not an object")]
    NotAnObject,
}

/// `target` with the patch in `body` applied.
pub(super) fn apply(
    patch_type: PatchType,
    target: &Value,
    body: &[u8],
) -> Result<Value, PatchError> {
    let mut patched = target.clone();
    match patch_type {
        PatchType::Json => {
            let patch: json_patch::Patch =
                serde_json::from_slice(body).map_err(PatchError::ParseJsonPatch)?;
            json_patch::patch(&mut patched, &patch).map_err(PatchError::ApplyJsonPatch)?;
        }
        PatchType::Merge | PatchType::StrategicMerge => {
            let patch: Value = serde_json::from_slice(body).map_err(PatchError::ParseJson)?;
            json_patch::merge(&mut patched, &patch);
        }
        PatchType::Apply => {
            let patch: Value = serde_yaml_ng::from_slice(body).map_err(PatchError::ParseYaml)?;
            json_patch::merge(&mut patched, &patch);
        }
    }
    if patched.is_object() {
        Ok(patched)
    } else {
        Err(PatchError::NotAnObject)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"name": "a", "annotations": {"keep": "1"}}, "spec": {"nodeName": "n1"}})
    }

    fn patched(patch_type: PatchType, body: &str) -> Value {
        match apply(patch_type, &pod(), body.as_bytes()) {
            Ok(object) => object,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    #[test]
    fn merge_patches_add_and_remove_annotations() {
        let body = r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled","keep":null}}}"#;
        for patch_type in [PatchType::Merge, PatchType::StrategicMerge] {
            assert_eq!(
                patched(patch_type, body)["metadata"]["annotations"],
                json!({"ambient.istio.io/redirection": "enabled"})
            );
        }
        let applied = patched(
            PatchType::Apply,
            "metadata:\n  annotations:\n    ambient.istio.io/redirection: enabled\n",
        );
        assert_eq!(applied["metadata"]["annotations"]["keep"], "1");
        assert_eq!(
            applied["metadata"]["annotations"]["ambient.istio.io/redirection"],
            "enabled"
        );
    }

    #[test]
    fn json_patches_escape_slashes_in_keys() {
        let body = r#"[
            {"op": "test", "path": "/spec/nodeName", "value": "n1"},
            {"op": "add", "path": "/metadata/annotations/ambient.istio.io~1redirection", "value": "enabled"},
            {"op": "replace", "path": "/spec/nodeName", "value": "n2"},
            {"op": "remove", "path": "/metadata/annotations/keep"}
        ]"#;
        let object = patched(PatchType::Json, body);
        assert_eq!(
            object["metadata"]["annotations"],
            json!({"ambient.istio.io/redirection": "enabled"})
        );
        assert_eq!(object["spec"]["nodeName"], "n2");
    }

    #[test]
    fn failing_and_malformed_patches_are_errors() {
        let failing_test = r#"[{"op": "test", "path": "/spec/nodeName", "value": "n9"}]"#;
        assert!(matches!(
            apply(PatchType::Json, &pod(), failing_test.as_bytes()),
            Err(PatchError::ApplyJsonPatch(_))
        ));
        assert!(apply(PatchType::Json, &pod(), b"{}").is_err());
        assert!(apply(PatchType::Merge, &pod(), b"[1").is_err());
        assert!(matches!(
            apply(PatchType::Merge, &pod(), b"3"),
            Err(PatchError::NotAnObject)
        ));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }
}
