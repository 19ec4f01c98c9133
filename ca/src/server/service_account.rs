//! Kubernetes service accounts, as TokenReview names them and as flags list them.

use std::fmt;
use std::str::FromStr;

use super::namespaced_name::is_object_name;

/// How the API server names the user of a service-account token.
const USERNAME_PREFIX: &str = "system:serviceaccount:";

/// A service account: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    namespace: String,
    name: String,
}

/// Why a string does not name a service account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a service account: expected NAMESPACE/NAME, each lowercase letters, digits, '-' or '.'"
)]
pub struct ServiceAccountError(String);

impl ServiceAccount {
    pub fn new(namespace: &str, name: &str) -> Result<Self, ServiceAccountError> {
        if !is_object_name(namespace) || !is_object_name(name) {
            return Err(ServiceAccountError(format!("{namespace}/{name}")));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The service account of a token's user, `system:serviceaccount:NAMESPACE:NAME`; `None`
    /// for any other user.
    pub(crate) fn from_username(username: &str) -> Option<Self> {
        let (namespace, name) = username.strip_prefix(USERNAME_PREFIX)?.split_once(':')?;
        Self::new(namespace, name).ok()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FromStr for ServiceAccount {
    type Err = ServiceAccountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| ServiceAccountError(s.to_owned()))?;
        Self::new(namespace, name).map_err(|_| ServiceAccountError(s.to_owned()))
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_and_token_users() {
        let account: ServiceAccount = "ambit-system/ambit".parse().unwrap();
        assert_eq!(
            (account.namespace(), account.name()),
            ("ambit-system", "ambit")
        );
        assert_eq!(account.to_string(), "ambit-system/ambit");
        for bad in [
            "",
            "ambit",
            "/ambit",
            "ambit-system/",
            "a/b/c",
            "A/b",
            "a:b/c",
        ] {
            assert!(bad.parse::<ServiceAccount>().is_err(), "{bad}");
        }

        assert_eq!(
            ServiceAccount::from_username("system:serviceaccount:shop:web"),
            Some(ServiceAccount::new("shop", "web").unwrap())
        );
        for other in [
            "alice",
            "system:node:node1",
            "system:serviceaccount:shop",
            "system:serviceaccount:shop:web:extra",
        ] {
            assert_eq!(ServiceAccount::from_username(other), None, "{other}");
        }
    }
}
