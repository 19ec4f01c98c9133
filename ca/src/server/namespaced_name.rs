//! The objects the CA keeps in the API server, named by namespace and name as the flags give
//! them: the ConfigMap it publishes its roots in, and the Secret that keeps a root it created.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use kube::api::ObjectMeta;

/// The label of the objects the CA writes, saying who keeps them up to date.
pub(crate) const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub(crate) const MANAGED_BY: &str = "ambit-ca";

/// A Kubernetes object name (a DNS subdomain), checked: what namespaces, ConfigMaps and
/// Secrets are called.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectName(String);

/// Why a string is not a name Kubernetes accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes object name: 1 to 253 lowercase letters, digits, '-' or '.'")]
pub struct ObjectNameError(String);

/// A namespaced object: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespacedName {
    pub namespace: ObjectName,
    pub name: ObjectName,
}

impl ObjectName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ObjectName {
    type Err = ObjectNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_object_name(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(ObjectNameError(s.to_owned()))
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The metadata the CA gives the objects it writes: its label, nothing else.
pub(crate) fn owned_metadata() -> ObjectMeta {
    ObjectMeta {
        labels: Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_owned(),
            MANAGED_BY.to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

/// Whether `text` is a DNS subdomain as Kubernetes checks object names.
pub(crate) fn is_object_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains() {
        let name = NamespacedName {
            namespace: "ambit-system".parse().unwrap(),
            name: "ambit-ca-root-cert".parse().unwrap(),
        };
        assert_eq!(name.to_string(), "ambit-system/ambit-ca-root-cert");
        for bad in ["", "A", "a/b", "a b", "a_b", &"a".repeat(254)] {
            assert!(bad.parse::<ObjectName>().is_err(), "{bad:?}");
        }
    }
}
