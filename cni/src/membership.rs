//! Whether a pod belongs in the ambient mesh, from Istio's labels and annotations.

use std::collections::BTreeMap;

/// The label that enrols a namespace (`ambient`) and that a pod may set to override it.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Set on pods that carry an Istio sidecar; those are never captured by the node.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// Whether a pod is in the mesh: never with a sidecar; else the pod's own
/// `istio.io/dataplane-mode` decides when it is `none` or `ambient`; else the namespace's
/// `istio.io/dataplane-mode=ambient`. Host-network pods are the caller's to exclude.
pub fn in_mesh(
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> bool {
    if pod_annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return false;
    }
    match pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace_labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|mode| mode == "ambient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "ambient")];
    const NONE: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "none")];
    const SIDECAR: &[(&str, &str)] = &[(SIDECAR_STATUS_ANNOTATION, "{}")];

    #[test]
    fn the_namespace_enrols_its_pods() {
        assert!(in_mesh(&map(AMBIENT), &map(&[]), &map(&[])));
        assert!(!in_mesh(&map(&[]), &map(&[]), &map(&[])));
        assert!(!in_mesh(
            &map(&[(DATAPLANE_MODE_LABEL, "sidecar")]),
            &map(&[]),
            &map(&[])
        ));
    }

    #[test]
    fn the_pod_label_wins() {
        assert!(!in_mesh(&map(AMBIENT), &map(NONE), &map(&[])));
        assert!(in_mesh(&map(&[]), &map(AMBIENT), &map(&[])));
        assert!(in_mesh(
            &map(AMBIENT),
            &map(&[(DATAPLANE_MODE_LABEL, "other")]),
            &map(&[])
        ));
    }

    #[test]
    fn a_pod_with_a_sidecar_is_never_in_the_mesh() {
        assert!(!in_mesh(&map(AMBIENT), &map(&[]), &map(SIDECAR)));
        assert!(!in_mesh(&map(AMBIENT), &map(AMBIENT), &map(SIDECAR)));
    }
}
