//! The file source: ordinary Kubernetes objects in one multi-document YAML file, reloaded when
//! the file changes. A file that fails to parse is reported, document and field, and the last
//! good state stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::translate::{ObjectError, Objects, Origin, Sourced};
use crate::drain::DrainWatcher;
use crate::error_chain::ErrorChain;
use crate::state::ClusterState;

/// How often the file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why the file could not be turned into a cluster state.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("document {document}: not valid YAML")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("document {document} ({object}): field `{field}`: {message}")]
    Field {
        document: usize,
        object: String,
        field: String,
        message: String,
    },
}

/// Reads cluster objects from a YAML file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    root_namespace: String,
}

impl FileSource {
    /// The file at `path`; policies in `root_namespace` apply to the whole mesh.
    pub fn new(path: impl Into<PathBuf>, root_namespace: &str) -> Self {
        Self {
            path: path.into(),
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// Reads and parses the file once.
    pub fn load(&self) -> Result<ClusterState, SourceError> {
        let text = read(&self.path)?;
        self.parse(&text)
    }

    /// Parses `text`, reporting the policies that were rejected (they stand in as fail-closed).
    fn parse(&self, text: &str) -> Result<ClusterState, SourceError> {
        let state = parse(text, &self.root_namespace)?;
        for rejected in state.rejected_policies() {
            tracing::error!(path = %self.path.display(), error = rejected, "policy rejected: enforcing it as fail-closed");
        }
        Ok(state)
    }

    /// Publishes a new state into `states` whenever the file changes and still parses, until a
    /// drain starts.
    pub async fn watch(self, states: watch::Sender<Arc<ClusterState>>, mut drain: DrainWatcher) {
        let mut last = read(&self.path).ok();
        loop {
            tokio::select! {
                () = drain.signaled() => return,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let text = match read(&self.path) {
                Ok(text) => text,
                Err(error) => {
                    tracing::warn!(
                        error = %ErrorChain(&error),
                        "keeping the last good state"
                    );
                    continue;
                }
            };
            if last.as_ref() == Some(&text) {
                continue;
            }
            // Parsing and compiling a large file takes a while: off the proxies' threads.
            let (source, parsing) = (self.clone(), text.clone());
            let parsed = tokio::task::spawn_blocking(move || source.parse(&parsing))
                .await
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
            match parsed {
                Ok(state) => {
                    tracing::info!(path = %self.path.display(), workloads = state.workloads().len(), "configuration reloaded");
                    states.send_replace(Arc::new(state));
                }
                Err(error) => tracing::error!(
                    path = %self.path.display(),
                    error = %ErrorChain(&error),
                    "configuration rejected, keeping the last good state"
                ),
            }
            last = Some(text);
        }
    }
}

fn read(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path).map_err(|e| SourceError::Read(path.to_owned(), e))
}

pub(crate) fn parse(text: &str, root_namespace: &str) -> Result<ClusterState, SourceError> {
    let mut objects = Objects::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        // As JSON, as the API server serves objects: map keys are strings, whatever YAML made
        // of them (`portLevelMtls: {9090: ...}`).
        let value =
            serde_json::Value::deserialize(document).map_err(|source| SourceError::Yaml {
                document: document_number,
                source,
            })?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        let origin = Origin::Document(document_number);
        let n = document_number;
        match kind {
            "Namespace" => objects.namespaces.push(Arc::new(typed(n, &value)?)),
            "Node" => objects.nodes.push(Arc::new(typed(n, &value)?)),
            "Pod" => objects.pods.push(sourced(origin, typed(n, &value)?)),
            "Service" => objects.services.push(sourced(origin, typed(n, &value)?)),
            "EndpointSlice" => objects.endpoint_slices.push(Arc::new(typed(n, &value)?)),
            "AuthorizationPolicy" => objects.authorization_policies.push(sourced(origin, value)),
            "PeerAuthentication" => objects.peer_authentications.push(sourced(origin, value)),
            "ServiceEntry" => objects.service_entries.push(sourced(origin, value)),
            "" => {
                return Err(SourceError::Field {
                    document: document_number,
                    object: describe(&value),
                    field: "kind".into(),
                    message: "missing".into(),
                });
            }
            other => tracing::debug!(kind = other, document = document_number, "ignoring object"),
        }
    }
    let translated = objects.translate(root_namespace);
    match translated.errors.into_iter().next() {
        Some(error) => Err(SourceError::Object(error)),
        None => Ok(translated.state),
    }
}

fn sourced<T>(origin: Origin, object: T) -> Sourced<T> {
    Sourced {
        origin,
        object: Arc::new(object),
    }
}

fn typed<T: DeserializeOwned>(
    document: usize,
    value: &serde_json::Value,
) -> Result<T, SourceError> {
    serde_path_to_error::deserialize(value).map_err(|error| SourceError::Field {
        document,
        object: describe(value),
        field: error.path().to_string(),
        message: error.into_inner().to_string(),
    })
}

/// `Kind namespace/name`, as far as the document says.
fn describe(value: &serde_json::Value) -> String {
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(value, |v, key| v.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "{} {}/{}",
        field(&["kind"]),
        field(&["metadata", "namespace"]),
        field(&["metadata", "name"])
    )
}

#[cfg(test)]
mod tests;
