//! The CA's roots, published for the agents in a ConfigMap (`root-cert.pem`), which they
//! mount to authenticate the CA and to trust their peers.
//!
//! The ConfigMap is made to hold the roots of the CA loaded now: at start, after each reload,
//! and again every [`RESYNC_INTERVAL`], so that a ConfigMap deleted or edited by hand (or by a
//! Helm upgrade from a chart that rendered it) is put back. The CA owns the key `root-cert.pem`
//! and the `managed-by` label only: a merge patch writes them and leaves other keys, labels and
//! annotations alone, since the agents read that key alone. Replicas write the same roots, so
//! the last writer needs no precondition. A failed attempt is logged, counted and retried at the
//! next poll; signing never waits for it.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ambit_identity::ROOT_CERT_FILE;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};

use super::api::{ApiCallError, bounded};
use super::metrics::Metrics;
use super::namespaced_name::{MANAGED_BY, MANAGED_BY_LABEL, NamespacedName, owned_metadata};
use super::refusal::WithCauses;

/// The key the agents read the roots from, named as in the CA directory.
const ROOTS_KEY: &str = ROOT_CERT_FILE;
/// How long a ConfigMap found up to date is trusted to stay so before it is read again.
const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps the roots ConfigMap equal to the roots the CA signs under.
pub(crate) struct RootPublisher {
    configmaps: Api<ConfigMap>,
    target: NamespacedName,
    metrics: Metrics,
    /// The roots last found or written in the ConfigMap, and when; `None` until the first
    /// success and after each failure.
    confirmed: Mutex<Option<Confirmed>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Confirmed {
    roots: String,
    at: Instant,
}

/// What the ConfigMap needs to hold the roots.
#[derive(Debug, PartialEq)]
enum Change {
    Nothing,
    Create(ConfigMap),
    /// A merge patch of the key and the label.
    Patch(ConfigMap),
}

/// What an attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Unchanged,
    Created,
    Updated,
}

/// Why the roots could not be published.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("failed to read the ConfigMap")]
    Read(#[source] ApiCallError),
    #[error("failed to create the ConfigMap")]
    Create(#[source] ApiCallError),
    #[error("failed to update the ConfigMap")]
    Update(#[source] ApiCallError),
}

impl RootPublisher {
    pub(crate) fn new(client: kube::Client, target: NamespacedName, metrics: Metrics) -> Self {
        Self {
            configmaps: Api::namespaced(client, target.namespace.as_str()),
            target,
            metrics,
            confirmed: Mutex::new(None),
        }
    }

    /// Makes the ConfigMap hold `roots` (PEM) if it may not already; on failure, logs and
    /// counts it, and leaves it due for the next call.
    pub(crate) async fn publish(&self, roots: &str) {
        let now = Instant::now();
        let confirmed = self.confirmed().clone();
        if !is_due(confirmed.as_ref(), roots, now) {
            return;
        }
        let outcome = self.write(roots).await;
        let configmap = tracing::field::display(&self.target);
        let confirmed = match outcome {
            Ok(written) => {
                match written {
                    Written::Created => {
                        tracing::info!(configmap, "published the roots in a new ConfigMap");
                    }
                    Written::Updated => tracing::info!(configmap, "published the roots"),
                    Written::Unchanged => {
                        tracing::debug!(configmap, "the ConfigMap holds the roots already");
                    }
                }
                Some(Confirmed {
                    roots: roots.to_owned(),
                    at: now,
                })
            }
            Err(error) => {
                self.metrics.count_root_publish_failure();
                tracing::warn!(
                    configmap,
                    error = %WithCauses(&error),
                    "failed to publish the roots; retrying at the next poll"
                );
                None
            }
        };
        *self.confirmed() = confirmed;
    }

    fn confirmed(&self) -> std::sync::MutexGuard<'_, Option<Confirmed>> {
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn write(&self, roots: &str) -> Result<Written, PublishError> {
        match self.apply(self.change(roots).await?).await {
            // Another replica created it since the read: bring that one up to date.
            Err(PublishError::Create(error)) if error.is_already_exists() => {
                self.apply(self.change(roots).await?).await
            }
            written => written,
        }
    }

    async fn change(&self, roots: &str) -> Result<Change, PublishError> {
        let current = bounded(self.configmaps.get_opt(self.target.name.as_str()))
            .await
            .map_err(PublishError::Read)?;
        Ok(change(current.as_ref(), &self.target, roots))
    }

    async fn apply(&self, change: Change) -> Result<Written, PublishError> {
        match change {
            Change::Nothing => Ok(Written::Unchanged),
            Change::Create(configmap) => {
                bounded(self.configmaps.create(&PostParams::default(), &configmap))
                    .await
                    .map_err(PublishError::Create)?;
                Ok(Written::Created)
            }
            Change::Patch(patch) => {
                bounded(self.configmaps.patch(
                    self.target.name.as_str(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                ))
                .await
                .map_err(PublishError::Update)?;
                Ok(Written::Updated)
            }
        }
    }
}

impl std::fmt::Debug for RootPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPublisher")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Whether the ConfigMap must be looked at: it was never confirmed, holds other roots than
/// `roots`, or was confirmed a resync interval ago.
fn is_due(confirmed: Option<&Confirmed>, roots: &str, now: Instant) -> bool {
    confirmed.is_none_or(|confirmed| {
        confirmed.roots != roots || now.duration_since(confirmed.at) >= RESYNC_INTERVAL
    })
}

/// What turns `current` (`None`: absent) into a ConfigMap holding `roots` under the CA's label.
fn change(current: Option<&ConfigMap>, target: &NamespacedName, roots: &str) -> Change {
    let Some(current) = current else {
        return Change::Create(ConfigMap {
            metadata: ObjectMeta {
                name: Some(target.name.to_string()),
                namespace: Some(target.namespace.to_string()),
                ..owned_metadata()
            },
            ..holding(roots)
        });
    };
    let holds_roots = current
        .data
        .as_ref()
        .and_then(|data| data.get(ROOTS_KEY))
        .is_some_and(|held| held == roots);
    let labelled = current
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_BY_LABEL))
        .is_some_and(|value| value == MANAGED_BY);
    if holds_roots && labelled {
        Change::Nothing
    } else {
        Change::Patch(ConfigMap {
            metadata: owned_metadata(),
            ..holding(roots)
        })
    }
}

/// A ConfigMap with the roots only, no metadata.
fn holding(roots: &str) -> ConfigMap {
    ConfigMap {
        data: Some(BTreeMap::from([(ROOTS_KEY.to_owned(), roots.to_owned())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOTS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn target() -> NamespacedName {
        NamespacedName {
            namespace: "ambit-system".parse().unwrap(),
            name: "ambit-ca-root-cert".parse().unwrap(),
        }
    }

    fn existing(data: &[(&str, &str)], labels: &[(&str, &str)]) -> ConfigMap {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("ambit-ca-root-cert".into()),
                labels: Some(map(labels)),
                ..ObjectMeta::default()
            },
            data: Some(map(data)),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn an_absent_configmap_is_created_with_the_roots_and_the_label() {
        let Change::Create(created) = change(None, &target(), ROOTS) else {
            panic!("not a create");
        };
        assert_eq!(created.metadata.name.as_deref(), Some("ambit-ca-root-cert"));
        assert_eq!(created.metadata.namespace.as_deref(), Some("ambit-system"));
        assert_eq!(
            created.metadata.labels.unwrap()[MANAGED_BY_LABEL],
            MANAGED_BY
        );
        assert_eq!(
            created.data.unwrap(),
            BTreeMap::from([(ROOTS_KEY.into(), ROOTS.into())])
        );
    }

    #[test]
    fn other_roots_or_a_missing_label_are_patched_and_nothing_else_is_touched() {
        let label = [(MANAGED_BY_LABEL, MANAGED_BY)];
        let up_to_date = existing(&[(ROOTS_KEY, ROOTS), ("other", "kept")], &label);
        assert_eq!(change(Some(&up_to_date), &target(), ROOTS), Change::Nothing);

        for stale in [
            existing(&[(ROOTS_KEY, "old roots")], &label),
            existing(&[], &label),
            existing(&[(ROOTS_KEY, ROOTS)], &[(MANAGED_BY_LABEL, "Helm")]),
        ] {
            let Change::Patch(patch) = change(Some(&stale), &target(), ROOTS) else {
                panic!("not a patch: {stale:?}");
            };
            // A merge patch: only what it names changes, the name and namespace stay out of it.
            assert_eq!(patch.metadata, owned_metadata());
            assert_eq!(patch.data, holding(ROOTS).data);
        }
    }

    #[test]
    fn published_roots_are_looked_at_again_when_they_change_or_after_a_while() {
        let now = Instant::now();
        assert!(is_due(None, ROOTS, now));
        let confirmed = Confirmed {
            roots: ROOTS.into(),
            at: now,
        };
        assert!(!is_due(
            Some(&confirmed),
            ROOTS,
            now + Duration::from_secs(5)
        ));
        assert!(is_due(Some(&confirmed), "new roots", now));
        assert!(is_due(Some(&confirmed), ROOTS, now + RESYNC_INTERVAL));
    }
}
