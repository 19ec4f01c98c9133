//! Who is calling: the bearer token of the request, reviewed by the API server (TokenReview),
//! must be a service account's, valid for this CA's audience.
//!
//! Reviews are not cached. A node asks for each identity it holds once per half-life of its
//! certificate, a few requests per node per hour, which the API server answers from its own
//! caches; and a cache here would keep honouring the token of a deleted pod for its lifetime,
//! the very thing binding tokens to pods puts an end to.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Api;
use kube::api::PostParams;
use tonic::Code;
use tonic::metadata::MetadataMap;

use super::api::{ApiCallError, bounded};
use super::refusal::Refusal;
use super::service_account::ServiceAccount;
use crate::CLUSTER_ID_HEADER;

/// Service-account tokens are about a kilobyte; a longer one is not reviewed, so that junk
/// costs the API server nothing.
const MAX_TOKEN_LENGTH: usize = 16 * 1024;

/// The metadata that carries the caller's token.
const AUTHORIZATION: &str = "authorization";
const BEARER: &str = "bearer ";
/// The `extra` keys of a token bound to a pod.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Reviews callers' tokens with the API server.
pub(crate) struct Authenticator {
    reviews: Api<TokenReview>,
    audience: String,
    cluster_id: String,
}

/// A caller whose token the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) account: ServiceAccount,
    /// The pod the token was issued to, for a token bound to one.
    pub(crate) pod: Option<BoundPod>,
}

/// The pod a token is bound to, as the API server tells in the review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BoundPod {
    pub(crate) name: String,
    pub(crate) uid: String,
}

/// Why the caller is not authenticated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthenticateError {
    #[error("the request has no bearer token in its {AUTHORIZATION:?} metadata")]
    MissingToken,
    #[error("the bearer token is longer than {MAX_TOKEN_LENGTH} bytes")]
    TokenTooLong,
    #[error("the caller claims cluster {claimed:?}; this CA serves cluster {served:?}")]
    WrongCluster { claimed: String, served: String },
    #[error("the API server did not authenticate the token: {0}")]
    TokenRejected(String),
    #[error("the token is not valid for the audience {0:?}")]
    WrongAudience(String),
    #[error("the token authenticates {0:?}, which is not a service account")]
    NotAServiceAccount(String),
    #[error("failed to review the token")]
    Review(#[source] ApiCallError),
}

impl From<AuthenticateError> for Refusal {
    fn from(error: AuthenticateError) -> Self {
        let (code, reason) = match &error {
            AuthenticateError::MissingToken => (Code::Unauthenticated, "missing_token"),
            AuthenticateError::TokenTooLong => (Code::Unauthenticated, "token_too_long"),
            AuthenticateError::WrongCluster { .. } => (Code::Unauthenticated, "wrong_cluster"),
            AuthenticateError::TokenRejected(_) => (Code::Unauthenticated, "token_rejected"),
            AuthenticateError::WrongAudience(_) => (Code::Unauthenticated, "wrong_audience"),
            AuthenticateError::NotAServiceAccount(_) => {
                (Code::Unauthenticated, "not_a_service_account")
            }
            AuthenticateError::Review(_) => (Code::Unavailable, "token_review_failed"),
        };
        Self::new(code, reason, &error)
    }
}

impl Authenticator {
    pub(crate) fn new(client: kube::Client, audience: String, cluster_id: String) -> Self {
        Self {
            reviews: Api::all(client),
            audience,
            cluster_id,
        }
    }

    /// The caller of a request with `metadata`.
    pub(crate) async fn authenticate(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Caller, AuthenticateError> {
        check_cluster(metadata, &self.cluster_id)?;
        let token = bearer_token(metadata)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = bounded(self.reviews.create(&PostParams::default(), &review))
            .await
            .map_err(AuthenticateError::Review)?;
        caller(&reviewed.status.unwrap_or_default(), &self.audience)
    }
}

/// A caller that names its cluster must name ours; one that does not is taken to be local, as
/// istiod does.
fn check_cluster(metadata: &MetadataMap, served: &str) -> Result<(), AuthenticateError> {
    let Some(claimed) = metadata.get(CLUSTER_ID_HEADER) else {
        return Ok(());
    };
    match claimed.to_str() {
        Ok(claimed) if claimed.is_empty() || claimed == served => Ok(()),
        _ => Err(AuthenticateError::WrongCluster {
            claimed: String::from_utf8_lossy(claimed.as_encoded_bytes()).into_owned(),
            served: served.to_owned(),
        }),
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthenticateError> {
    let value = metadata
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or(AuthenticateError::MissingToken)?;
    let (scheme, token) = value
        .split_at_checked(BEARER.len())
        .ok_or(AuthenticateError::MissingToken)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case(BEARER) || token.is_empty() {
        return Err(AuthenticateError::MissingToken);
    }
    if token.len() > MAX_TOKEN_LENGTH {
        return Err(AuthenticateError::TokenTooLong);
    }
    Ok(token)
}

/// The caller a review's status vouches for, if it authenticated a service account for
/// `audience`.
fn caller(status: &TokenReviewStatus, audience: &str) -> Result<Caller, AuthenticateError> {
    if status.authenticated != Some(true) {
        let error = status.error.as_deref().unwrap_or("not authenticated");
        return Err(AuthenticateError::TokenRejected(error.to_owned()));
    }
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|granted| granted == audience) {
        return Err(AuthenticateError::WrongAudience(audience.to_owned()));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let account = ServiceAccount::from_username(&username)
        .ok_or(AuthenticateError::NotAServiceAccount(username))?;
    let extra = user.extra.unwrap_or_default();
    let pod = match (
        single(&extra, POD_NAME_EXTRA),
        single(&extra, POD_UID_EXTRA),
    ) {
        (Some(name), Some(uid)) => Some(BoundPod {
            name: name.to_owned(),
            uid: uid.to_owned(),
        }),
        _ => None,
    };
    Ok(Caller { account, pod })
}

/// The one non-empty value of `key`.
fn single<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key)?.as_slice() {
        [value] if !value.is_empty() => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn metadata(entries: &[(&'static str, &str)]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for (key, value) in entries {
            metadata.insert(*key, value.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn the_token_is_a_bearer_token() {
        let token = |value: &str| {
            bearer_token(&metadata(&[(AUTHORIZATION, value)]))
                .ok()
                .map(str::to_owned)
        };
        assert_eq!(token("Bearer abc"), Some("abc".to_owned()));
        assert_eq!(token("bearer abc"), Some("abc".to_owned()));
        for refused in ["Bearer ", "Bearer", "Basic abc", "abc", ""] {
            assert_eq!(token(refused), None, "{refused:?}");
        }
        assert!(matches!(
            bearer_token(&MetadataMap::new()),
            Err(AuthenticateError::MissingToken)
        ));
    }

    #[test]
    fn a_named_cluster_must_be_ours() {
        let check = |entries| check_cluster(&metadata(entries), "Kubernetes");
        assert!(check(&[]).is_ok());
        assert!(check(&[(CLUSTER_ID_HEADER, "Kubernetes")]).is_ok());
        assert!(matches!(
            check(&[(CLUSTER_ID_HEADER, "other")]),
            Err(AuthenticateError::WrongCluster { .. })
        ));
    }

    fn status(username: &str, audiences: &[&str], extra: &[(&str, &[&str])]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| {
                            ((*k).to_owned(), v.iter().map(|v| (*v).to_owned()).collect())
                        })
                        .collect(),
                ),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn a_reviewed_service_account_is_the_caller() {
        let bound = status(
            "system:serviceaccount:ambit-system:ambit",
            &["istio-ca"],
            &[(POD_NAME_EXTRA, &["ambit-node1"]), (POD_UID_EXTRA, &["u1"])],
        );
        let caller = caller(&bound, "istio-ca").unwrap();
        assert_eq!(caller.account, "ambit-system/ambit".parse().unwrap());
        assert_eq!(
            caller.pod,
            Some(BoundPod {
                name: "ambit-node1".into(),
                uid: "u1".into()
            })
        );

        let unbound = status(
            "system:serviceaccount:shop:web",
            &["istio-ca"],
            &[(POD_NAME_EXTRA, &["web"])],
        );
        assert_eq!(super::caller(&unbound, "istio-ca").unwrap().pod, None);
    }

    #[test]
    fn anything_else_is_refused() {
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("[invalid bearer token, token has expired]".into()),
            ..TokenReviewStatus::default()
        };
        assert!(matches!(
            caller(&rejected, "istio-ca"),
            Err(AuthenticateError::TokenRejected(e)) if e.contains("expired")
        ));
        let other_audience = status("system:serviceaccount:shop:web", &["api"], &[]);
        assert!(matches!(
            caller(&other_audience, "istio-ca"),
            Err(AuthenticateError::WrongAudience(_))
        ));
        let no_audience = status("system:serviceaccount:shop:web", &[], &[]);
        assert!(matches!(
            caller(&no_audience, "istio-ca"),
            Err(AuthenticateError::WrongAudience(_))
        ));
        let person = status("alice", &["istio-ca"], &[]);
        assert!(matches!(
            caller(&person, "istio-ca"),
            Err(AuthenticateError::NotAServiceAccount(_))
        ));
    }
}
