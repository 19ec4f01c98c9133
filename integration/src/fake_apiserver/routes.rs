//! Request paths, parsed into what they address.

use serde_json::{Map, Value};

use super::resources::ResourceId;

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// `/version`
    Version,
    /// `/healthz`, `/livez`, `/readyz`
    Health,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}`
    Group(String),
    /// `/api/v1`, `/apis/{group}/{version}`
    Resources { group: String, version: String },
    /// `.../[namespaces/{namespace}/]{plural}`
    Collection(Target),
    /// `.../[namespaces/{namespace}/]{plural}/{name}`
    Object(Target, String),
    /// `/fake/compact`
    Compact,
}

/// A resource in one version, in one namespace or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) resource: ResourceId,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
}

impl Target {
    /// `object` as served in this version: with `kind` and `apiVersion`.
    pub(super) fn typed(&self, object: &Value) -> Value {
        let resource = self.resource.resource();
        let mut typed = Map::new();
        typed.insert("kind".into(), resource.kind.into());
        typed.insert(
            "apiVersion".into(),
            resource.api_version(&self.version).into(),
        );
        if let Value::Object(fields) = object {
            typed.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Value::Object(typed)
    }

    /// `object` as stored: without `kind` and `apiVersion`.
    pub(super) fn untyped(mut object: Value) -> Value {
        if let Some(fields) = object.as_object_mut() {
            fields.remove("kind");
            fields.remove("apiVersion");
        }
        object
    }
}

impl Route {
    /// The route of `path`, or `None` when nothing is there.
    pub(super) fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            ["version"] => Some(Self::Version),
            ["healthz" | "livez" | "readyz"] => Some(Self::Health),
            ["fake", "compact"] => Some(Self::Compact),
            ["api"] => Some(Self::CoreVersions),
            ["apis"] => Some(Self::Groups),
            ["apis", group] => Some(Self::Group((*group).to_owned())),
            ["api", version, rest @ ..] => Self::in_group_version("", version, rest),
            ["apis", group, version, rest @ ..] => Self::in_group_version(group, version, rest),
            _ => None,
        }
    }

    fn in_group_version(group: &str, version: &str, rest: &[&str]) -> Option<Self> {
        let target = |plural: &str, namespace: Option<&str>| {
            let resource = ResourceId::by_plural(group, version, plural)?;
            (namespace.is_none() || resource.resource().namespaced).then(|| Target {
                resource,
                version: version.to_owned(),
                namespace: namespace.map(str::to_owned),
            })
        };
        match rest {
            [] => Some(Self::Resources {
                group: group.to_owned(),
                version: version.to_owned(),
            }),
            ["namespaces", namespace, plural] => {
                target(plural, Some(namespace)).map(Self::Collection)
            }
            ["namespaces", namespace, plural, name] => {
                target(plural, Some(namespace)).map(|t| Self::Object(t, (*name).to_owned()))
            }
            [plural] => target(plural, None).map(Self::Collection),
            [plural, name] => target(plural, None)
                .filter(|t| !t.resource.resource().namespaced)
                .map(|t| Self::Object(t, (*name).to_owned())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(api_version: &str, kind: &str) -> ResourceId {
        match ResourceId::by_kind(api_version, kind) {
            Some(id) => id,
            None => panic!("{api_version} {kind} is served"),
        }
    }

    fn target(api_version: &str, kind: &str, version: &str, ns: Option<&str>) -> Target {
        Target {
            resource: id(api_version, kind),
            version: version.into(),
            namespace: ns.map(Into::into),
        }
    }

    #[test]
    fn paths() {
        let pods = |ns| target("v1", "Pod", "v1", ns);
        let namespaces = target("v1", "Namespace", "v1", None);
        let policies = |ns| {
            target(
                "security.istio.io/v1beta1",
                "AuthorizationPolicy",
                "v1beta1",
                ns,
            )
        };
        for (path, route) in [
            ("/api/v1/pods", Some(Route::Collection(pods(None)))),
            (
                "/api/v1/namespaces/shop/pods",
                Some(Route::Collection(pods(Some("shop")))),
            ),
            (
                "/api/v1/namespaces/shop/pods/web",
                Some(Route::Object(pods(Some("shop")), "web".into())),
            ),
            (
                "/api/v1/namespaces",
                Some(Route::Collection(namespaces.clone())),
            ),
            (
                "/api/v1/namespaces/shop",
                Some(Route::Object(namespaces, "shop".into())),
            ),
            ("/api/v1/pods/web", None),
            ("/api/v1/namespaces/shop/namespaces", None),
            ("/api/v1/namespaces/shop/pods/web/status", None),
            ("/api/v2/pods", None),
            (
                "/apis/security.istio.io/v1beta1/namespaces/shop/authorizationpolicies",
                Some(Route::Collection(policies(Some("shop")))),
            ),
            (
                "/apis/security.istio.io/v1",
                Some(Route::Resources {
                    group: "security.istio.io".into(),
                    version: "v1".into(),
                }),
            ),
            (
                "/apis/security.istio.io",
                Some(Route::Group("security.istio.io".into())),
            ),
            ("/apis", Some(Route::Groups)),
            ("/api", Some(Route::CoreVersions)),
            ("/version", Some(Route::Version)),
            ("/fake/compact", Some(Route::Compact)),
            ("/", None),
        ] {
            assert_eq!(Route::parse(path), route, "{path}");
        }
    }
}
