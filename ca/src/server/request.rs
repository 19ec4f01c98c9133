//! What a request asks for: the identity (the caller's own, or the one it impersonates) and how
//! long the certificate should live.

use std::time::Duration;

use ambit_identity::{Identity, IdentityError, TrustDomain};
use prost_types::Struct;
use prost_types::value::Kind;
use tonic::Code;

use super::refusal::Refusal;
use super::service_account::ServiceAccount;
use crate::IMPERSONATED_IDENTITY;

/// Why a request does not name an identity this CA could issue.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityRequestError {
    #[error("the {IMPERSONATED_IDENTITY} metadata is not a string")]
    NotAString,
    #[error("the requested identity is malformed")]
    Malformed(#[source] IdentityError),
    #[error("{identity} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: TrustDomain,
    },
}

impl From<IdentityRequestError> for Refusal {
    fn from(error: IdentityRequestError) -> Self {
        let reason = match &error {
            IdentityRequestError::NotAString | IdentityRequestError::Malformed(_) => {
                "invalid_identity"
            }
            IdentityRequestError::ForeignTrustDomain { .. } => "foreign_trust_domain",
        };
        Self::new(Code::InvalidArgument, reason, &error)
    }
}

/// The identity a request asks for: `ImpersonatedIdentity` when it is set, else the caller's
/// own. An empty string counts as unset, as in istiod (proto3 cannot tell them apart).
pub(crate) fn requested_identity(
    metadata: Option<&Struct>,
    caller: &ServiceAccount,
    trust_domain: &TrustDomain,
) -> Result<Identity, IdentityRequestError> {
    let impersonated = metadata
        .and_then(|metadata| metadata.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|value| value.kind.as_ref());
    let named = match impersonated {
        None => None,
        Some(Kind::StringValue(text)) => Some(text).filter(|text| !text.is_empty()),
        Some(_) => return Err(IdentityRequestError::NotAString),
    };
    let identity: Identity = match named {
        Some(text) => text.parse(),
        None => Identity::new(trust_domain, caller.namespace(), caller.name()),
    }
    .map_err(IdentityRequestError::Malformed)?;
    if identity.trust_domain() != trust_domain {
        return Err(IdentityRequestError::ForeignTrustDomain {
            identity,
            trust_domain: trust_domain.clone(),
        });
    }
    Ok(identity)
}

/// How long issued certificates live: the requested lifetime, up to a maximum, or a default
/// when none is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    default: Duration,
    max: Duration,
}

/// Why a default and a maximum lifetime do not make a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlPolicyError {
    #[error("the default certificate lifetime must be more than zero")]
    ZeroDefault,
    #[error("the default certificate lifetime {default:?} exceeds the maximum {max:?}")]
    DefaultAboveMax { default: Duration, max: Duration },
    #[error("the maximum certificate lifetime {0:?} exceeds a year")]
    MaxAboveYear(Duration),
}

/// Workload certificates are meant to be short-lived; a longer maximum is a typo.
const LONGEST_MAX_TTL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

impl TtlPolicy {
    pub fn new(default: Duration, max: Duration) -> Result<Self, TtlPolicyError> {
        if default.is_zero() {
            return Err(TtlPolicyError::ZeroDefault);
        }
        if default > max {
            return Err(TtlPolicyError::DefaultAboveMax { default, max });
        }
        if max > LONGEST_MAX_TTL {
            return Err(TtlPolicyError::MaxAboveYear(max));
        }
        Ok(Self { default, max })
    }

    /// The lifetime of a certificate requested for `validity_seconds`: the default for zero
    /// or less (unset), the maximum for more than it.
    pub(crate) fn lifetime(&self, validity_seconds: i64) -> Duration {
        match u64::try_from(validity_seconds) {
            Ok(0) | Err(_) => self.default,
            Ok(seconds) => Duration::from_secs(seconds).min(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost_types::Value;

    use super::*;

    fn trust_domain() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    fn caller() -> ServiceAccount {
        "shop/web".parse().unwrap()
    }

    fn metadata(kind: Kind) -> Struct {
        Struct {
            fields: [(IMPERSONATED_IDENTITY.to_owned(), Value { kind: Some(kind) })].into(),
        }
    }

    fn asked(metadata: Option<&Struct>) -> Result<Identity, IdentityRequestError> {
        requested_identity(metadata, &caller(), &trust_domain())
    }

    #[test]
    fn without_impersonation_the_caller_gets_its_own_identity() {
        let own = "spiffe://cluster.local/ns/shop/sa/web";
        assert_eq!(asked(None).unwrap().as_str(), own);
        assert_eq!(asked(Some(&Struct::default())).unwrap().as_str(), own);
        let empty = metadata(Kind::StringValue(String::new()));
        assert_eq!(asked(Some(&empty)).unwrap().as_str(), own);
    }

    #[test]
    fn an_impersonated_identity_is_asked_for_as_it_is_named() {
        let db = metadata(Kind::StringValue(
            "spiffe://cluster.local/ns/shop/sa/db".into(),
        ));
        assert_eq!(
            asked(Some(&db)).unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/db"
        );
    }

    #[test]
    fn malformed_and_foreign_identities_are_refused() {
        let refused = |kind| asked(Some(&metadata(kind))).unwrap_err();
        assert!(matches!(
            refused(Kind::StringValue("spiffe://cluster.local/web".into())),
            IdentityRequestError::Malformed(_)
        ));
        assert!(matches!(
            refused(Kind::NumberValue(1.0)),
            IdentityRequestError::NotAString
        ));
        assert!(matches!(
            refused(Kind::StringValue(
                "spiffe://other.domain/ns/shop/sa/db".into()
            )),
            IdentityRequestError::ForeignTrustDomain { .. }
        ));
        let refusal = Refusal::from(refused(Kind::StringValue("db".into())));
        assert_eq!(
            (refusal.code, refusal.reason),
            (Code::InvalidArgument, "invalid_identity")
        );
    }

    #[test]
    fn lifetimes_default_and_clamp() {
        let hour = Duration::from_secs(3600);
        let policy = TtlPolicy::new(hour, 24 * hour).unwrap();
        assert_eq!(policy.lifetime(0), hour);
        assert_eq!(policy.lifetime(-5), hour);
        assert_eq!(policy.lifetime(600), Duration::from_secs(600));
        assert_eq!(policy.lifetime(24 * 3600), 24 * hour);
        assert_eq!(policy.lifetime(48 * 3600), 24 * hour);
        assert_eq!(policy.lifetime(i64::MAX), 24 * hour);

        assert_eq!(
            TtlPolicy::new(Duration::ZERO, hour),
            Err(TtlPolicyError::ZeroDefault)
        );
        assert!(matches!(
            TtlPolicy::new(2 * hour, hour),
            Err(TtlPolicyError::DefaultAboveMax { .. })
        ));
        assert!(matches!(
            TtlPolicy::new(hour, 400 * 24 * hour),
            Err(TtlPolicyError::MaxAboveYear(_))
        ));
    }
}
