//! The resources the fake serves: one row per resource, as discovery describes it.

/// Verbs of a resource whose objects the fake stores.
const STORED_VERBS: &[&str] = &["create", "delete", "get", "list", "patch", "watch"];

/// One served resource.
#[derive(Debug)]
pub(super) struct Resource {
    /// The API group; empty for the core group.
    pub(super) group: &'static str,
    /// Served versions, preferred first. Every version serves the same objects.
    pub(super) versions: &'static [&'static str],
    pub(super) kind: &'static str,
    pub(super) plural: &'static str,
    pub(super) singular: &'static str,
    pub(super) namespaced: bool,
    pub(super) verbs: &'static [&'static str],
    /// The CustomResourceDefinition whose presence makes the server serve this resource.
    pub(super) definition: Option<&'static str>,
    /// Fields a field selector may name besides `metadata.name` and `metadata.namespace`.
    pub(super) field_labels: &'static [&'static str],
}

impl Resource {
    /// `apiVersion` of this resource's objects in `version`.
    pub(super) fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// Whether the fake keeps objects of this resource (rather than only answering requests).
    pub(super) fn is_stored(&self) -> bool {
        self.verbs.contains(&"list")
    }
}

/// A row of [`RESOURCES`], the key of everything stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ResourceId(usize);

impl ResourceId {
    pub(super) fn resource(self) -> &'static Resource {
        &RESOURCES[self.0]
    }

    pub(super) fn all() -> impl Iterator<Item = Self> {
        (0..RESOURCES.len()).map(Self)
    }

    /// The resource `plural` in `group`/`version`, as a URL names it.
    pub(super) fn by_plural(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::all().find(|id| {
            let r = id.resource();
            r.group == group && r.plural == plural && r.versions.contains(&version)
        })
    }

    /// The resource of an object with this `apiVersion` and `kind`.
    pub(super) fn by_kind(api_version: &str, kind: &str) -> Option<Self> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        Self::all().find(|id| {
            let r = id.resource();
            r.group == group && r.kind == kind && r.versions.contains(&version)
        })
    }

    /// CustomResourceDefinitions, the last row of [`RESOURCES`].
    pub(super) const CUSTOM_RESOURCE_DEFINITIONS: Self = Self(RESOURCES.len() - 1);
}

/// Everything the fake serves. `CustomResourceDefinition` stays last.
const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &["status.phase"],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &["spec.unschedulable"],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
        ],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &["spec.clusterIP", "spec.type"],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &["type"],
    },
    Resource {
        group: "",
        versions: &["v1"],
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "reason",
            "type",
        ],
    },
    Resource {
        group: "events.k8s.io",
        versions: &["v1"],
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "type",
        ],
    },
    Resource {
        group: "discovery.k8s.io",
        versions: &["v1"],
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &["addressType"],
    },
    Resource {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        singular: "authorizationpolicy",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: Some("authorizationpolicies.security.istio.io"),
        field_labels: &[],
    },
    Resource {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        singular: "peerauthentication",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: Some("peerauthentications.security.istio.io"),
        field_labels: &[],
    },
    Resource {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1"],
        kind: "ServiceEntry",
        plural: "serviceentries",
        singular: "serviceentry",
        namespaced: true,
        verbs: STORED_VERBS,
        definition: Some("serviceentries.networking.istio.io"),
        field_labels: &[],
    },
    Resource {
        group: "authentication.k8s.io",
        versions: &["v1"],
        kind: "TokenReview",
        plural: "tokenreviews",
        singular: "tokenreview",
        namespaced: false,
        verbs: &["create"],
        definition: None,
        field_labels: &[],
    },
    Resource {
        group: "apiextensions.k8s.io",
        versions: &["v1"],
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        namespaced: false,
        verbs: STORED_VERBS,
        definition: None,
        field_labels: &[],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_plurals_name_the_same_rows() {
        for id in ResourceId::all() {
            let r = id.resource();
            for version in r.versions {
                assert_eq!(ResourceId::by_plural(r.group, version, r.plural), Some(id));
                assert_eq!(
                    ResourceId::by_kind(&r.api_version(version), r.kind),
                    Some(id)
                );
            }
        }
        let crd = ResourceId::CUSTOM_RESOURCE_DEFINITIONS.resource();
        assert_eq!(crd.kind, "CustomResourceDefinition");
    }

    #[test]
    fn configmaps_and_secrets_are_namespaced_core_resources() {
        for (kind, plural) in [("ConfigMap", "configmaps"), ("Secret", "secrets")] {
            let id = ResourceId::by_plural("", "v1", plural);
            assert_eq!(id, ResourceId::by_kind("v1", kind), "{kind}");
            let resource = id.map(ResourceId::resource);
            assert!(
                resource.is_some_and(|r| r.namespaced && r.is_stored()),
                "{kind}"
            );
        }
    }

    #[test]
    fn the_two_event_apis_are_distinct() {
        let core = ResourceId::by_kind("v1", "Event");
        let events = ResourceId::by_kind("events.k8s.io/v1", "Event");
        assert!(core.is_some() && events.is_some() && core != events);
    }
}
