//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";

/// Why a string is not a workload identity or a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    MissingScheme(String),
    #[error(
        "invalid trust domain {0:?}: expected 1 to 255 lowercase letters, digits, '.', '-' or '_'"
    )]
    InvalidTrustDomain(String),
    #[error(
        "{0:?} is not a workload identity: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkloadPath(String),
    #[error(
        "invalid {segment} {value:?} in a SPIFFE ID: expected letters, digits, '.', '-' or '_'"
    )]
    InvalidSegment {
        segment: &'static str,
        value: String,
    },
}

/// A SPIFFE trust domain, such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !valid {
            return Err(IdentityError::InvalidTrustDomain(s.to_owned()));
        }
        Ok(Self(s.into()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// The identity of a Kubernetes workload: its trust domain, namespace and service account.
///
/// Parsing is the only way to build one, so holding an `Identity` means holding a well-formed
/// SPIFFE ID. Cloning is cheap: the URI is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    trust_domain: TrustDomain,
    namespace: (usize, usize),
    service_account: usize,
}

impl Identity {
    /// Builds the identity of a service account in `namespace`.
    pub fn new(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account..]
    }

    /// The SPIFFE ID as a URI, as it appears in a certificate's SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme(s.to_owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotWorkloadPath(s.to_owned()))?;
        let trust_domain: TrustDomain = trust_domain.parse()?;
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(IdentityError::NotWorkloadPath(s.to_owned()));
        };
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;

        let namespace_start = SCHEME.len() + trust_domain.as_str().len() + "/ns/".len();
        let namespace_end = namespace_start + namespace.len();
        Ok(Self {
            uri: s.into(),
            trust_domain,
            namespace: (namespace_start, namespace_end),
            service_account: namespace_end + "/sa/".len(),
        })
    }
}

/// A path segment as the SPIFFE spec allows it, minus the relative forms `.` and `..`.
fn check_segment(segment: &'static str, value: &str) -> Result<(), IdentityError> {
    let valid = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(IdentityError::InvalidSegment {
            segment,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_identity() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "checkout");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
    }

    #[test]
    fn new_round_trips_through_parse() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let id = Identity::new(&td, "default", "web-1").unwrap();
        assert_eq!(id, id.as_str().parse().unwrap());
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web-1");
    }

    #[test]
    fn rejects_what_is_not_a_workload_identity() {
        let cases: &[(&str, IdentityError)] = &[
            ("", IdentityError::MissingScheme(String::new())),
            (
                "http://cluster.local/ns/a/sa/b",
                IdentityError::MissingScheme("http://cluster.local/ns/a/sa/b".into()),
            ),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                IdentityError::InvalidTrustDomain("Cluster.Local".into()),
            ),
            (
                "spiffe:///ns/a/sa/b",
                IdentityError::InvalidTrustDomain(String::new()),
            ),
            (
                "spiffe://cluster.local",
                IdentityError::NotWorkloadPath("spiffe://cluster.local".into()),
            ),
            (
                "spiffe://cluster.local/ns/a",
                IdentityError::NotWorkloadPath("spiffe://cluster.local/ns/a".into()),
            ),
            (
                "spiffe://cluster.local/sa/b/ns/a",
                IdentityError::NotWorkloadPath("spiffe://cluster.local/sa/b/ns/a".into()),
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                IdentityError::NotWorkloadPath("spiffe://cluster.local/ns/a/sa/b/extra".into()),
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                IdentityError::InvalidSegment {
                    segment: "namespace",
                    value: String::new(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a/sa/..",
                IdentityError::InvalidSegment {
                    segment: "service account",
                    value: "..".into(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a b/sa/c",
                IdentityError::InvalidSegment {
                    segment: "namespace",
                    value: "a b".into(),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&input.parse::<Identity>().unwrap_err(), expected, "{input}");
        }
    }

    #[test]
    fn error_messages_show_the_expected_form() {
        let err = "spiffe://cluster.local/default"
            .parse::<Identity>()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
        );
    }
}
