//! Asks the API server whether a pod is in the mesh: its namespace's and its own metadata,
//! read with the kubeconfig of the network configuration.

mod https;
mod kubeconfig;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use self::https::{Endpoint, HttpsError};
use self::kubeconfig::{Credentials, KubeconfigError};
use crate::membership::in_mesh;
use crate::protocol::PodRef;

/// Why the API server could not say.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("cannot use the kubeconfig")]
    Kubeconfig(#[from] KubeconfigError),
    #[error("cannot reach the API server")]
    Endpoint(#[source] HttpsError),
    #[error("{0:?} is not a Kubernetes object name")]
    BadName(String),
    #[error("GET {path} failed")]
    Get {
        path: String,
        #[source]
        source: HttpsError,
    },
    #[error("GET {path} answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("GET {path} did not return an object")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize, Debug)]
struct Object {
    metadata: Metadata,
}

#[derive(Deserialize, Debug, Default)]
struct Metadata {
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

/// Whether `pod` is in the mesh according to the API server, asked within `timeout`.
pub(crate) fn pod_in_mesh(
    kubeconfig: &Path,
    pod: &PodRef,
    timeout: Duration,
) -> Result<bool, LookupError> {
    let deadline = Instant::now() + timeout;
    let credentials = Credentials::load(kubeconfig)?;
    let endpoint = Endpoint::new(&credentials.server, &credentials.certificate_authority_pem)
        .map_err(LookupError::Endpoint)?;
    let namespace = object_name(&pod.namespace)?;
    let name = object_name(&pod.name)?;
    let get = |path: String| -> Result<Metadata, LookupError> {
        let response = endpoint
            .get(&path, &credentials.token, deadline)
            .map_err(|source| LookupError::Get {
                path: path.clone(),
                source,
            })?;
        if response.status != 200 {
            let body = String::from_utf8_lossy(&response.body);
            return Err(LookupError::Status {
                body: body.chars().take(256).collect(),
                path,
                status: response.status,
            });
        }
        serde_json::from_slice::<Object>(&response.body)
            .map(|object| object.metadata)
            .map_err(|source| LookupError::Decode { path, source })
    };
    let namespace_metadata = get(format!("/api/v1/namespaces/{namespace}"))?;
    let pod_metadata = get(format!("/api/v1/namespaces/{namespace}/pods/{name}"))?;
    Ok(in_mesh(
        &namespace_metadata.labels.unwrap_or_default(),
        &pod_metadata.labels.unwrap_or_default(),
        &pod_metadata.annotations.unwrap_or_default(),
    ))
}

/// `name` when it can go into a path as is: a DNS subdomain (lowercase letters, digits, `-`, `.`).
fn object_name(name: &str) -> Result<&str, LookupError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-.".contains(&byte)
        });
    if valid {
        Ok(name)
    } else {
        Err(LookupError::BadName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_go_into_paths() {
        assert!(object_name("client-7d9.x").is_ok());
        for name in ["", "../secrets", "a/b", "a?watch=1", "Upper", "a b"] {
            assert!(object_name(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn metadata_may_lack_labels_and_annotations() {
        let object: Object =
            serde_json::from_str(r#"{"kind":"Namespace","metadata":{"name":"a"}}"#).unwrap();
        assert_eq!(
            (object.metadata.labels, object.metadata.annotations),
            (None, None)
        );
    }
}
