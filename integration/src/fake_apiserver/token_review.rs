//! TokenReview, answered from a file of known tokens, which is read on every review so that
//! edits apply at once.
//!
//! The file is a YAML list:
//!
//! ```yaml
//! - token: secret
//!   username: system:serviceaccount:shop:client
//!   uid: 7d7b8f0a-...
//!   groups: [system:serviceaccounts, system:serviceaccounts:shop]
//!   extra: {authentication.kubernetes.io/pod-name: [client]}
//!   audiences: [istio-ca]
//!   expiresAt: 2030-01-01T00:00:00Z
//! ```
//!
//! Past `expiresAt` a token is refused as a real API server refuses an expired one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};

/// A token the fake authenticates, and whom as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KnownToken {
    token: String,
    username: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    extra: BTreeMap<String, Vec<String>>,
    /// Audiences the token is valid for; empty means any.
    #[serde(default)]
    audiences: Vec<String>,
    /// When the token stops authenticating; never if absent.
    #[serde(default, rename = "expiresAt")]
    expires_at: Option<Time>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum TokenReviewError {
    #[error("cannot read the tokens file {}", .0.display())]
    ReadTokens(PathBuf, #[source] std::io::Error),
    #[error("the tokens file {} is not a list of tokens", .0.display())]
    ParseTokens(PathBuf, #[source] serde_yaml_ng::Error),
    #[error("the body is not a TokenReview")]
    ParseReview(#[source] serde_json::Error),
}

/// Reads the tokens file; without one, no token is known.
pub(super) fn known_tokens(path: Option<&Path>) -> Result<Vec<KnownToken>, TokenReviewError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenReviewError::ReadTokens(path.to_owned(), e))?;
    let tokens: Option<Vec<KnownToken>> = serde_yaml_ng::from_str(&text)
        .map_err(|e| TokenReviewError::ParseTokens(path.to_owned(), e))?;
    Ok(tokens.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
struct ReviewRequest {
    #[serde(default)]
    spec: ReviewSpec,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewSpec {
    #[serde(default)]
    token: String,
    #[serde(default)]
    audiences: Vec<String>,
}

/// The TokenReview answering the review in `body` now.
pub(super) fn review(known: &[KnownToken], body: &[u8]) -> Result<Value, TokenReviewError> {
    review_at(known, body, Timestamp::now())
}

/// The TokenReview answering the review in `body` at `now`.
fn review_at(known: &[KnownToken], body: &[u8], now: Timestamp) -> Result<Value, TokenReviewError> {
    let request: Value = serde_json::from_slice(body).map_err(TokenReviewError::ParseReview)?;
    let ReviewRequest { spec } =
        serde_json::from_value(request.clone()).map_err(TokenReviewError::ParseReview)?;
    let status = match known.iter().find(|t| t.token == spec.token) {
        None => rejected("invalid bearer token".to_owned()),
        Some(token) if token.expires_at.as_ref().is_some_and(|at| at.0 <= now) => {
            rejected("token has expired".to_owned())
        }
        Some(token) => match granted_audiences(token, &spec.audiences) {
            Some(audiences) => authenticated(token, audiences),
            None => rejected(format!(
                "token audiences {:?} is invalid for the target audiences {:?}",
                token.audiences, spec.audiences
            )),
        },
    };
    Ok(json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": request.get("spec").cloned().unwrap_or_else(|| json!({})),
        "status": status,
    }))
}

/// The audiences the review grants, or `None` when the token is not valid for the requested
/// ones.
fn granted_audiences(token: &KnownToken, requested: &[String]) -> Option<Vec<String>> {
    if requested.is_empty() {
        return Some(token.audiences.clone());
    }
    if token.audiences.is_empty() {
        return Some(requested.to_vec());
    }
    let common: Vec<String> = requested
        .iter()
        .filter(|a| token.audiences.contains(a))
        .cloned()
        .collect();
    (!common.is_empty()).then_some(common)
}

fn authenticated(token: &KnownToken, audiences: Vec<String>) -> Value {
    let mut user = json!({"username": token.username, "groups": token.groups});
    if !token.uid.is_empty() {
        user["uid"] = json!(token.uid);
    }
    if !token.extra.is_empty() {
        user["extra"] = json!(token.extra);
    }
    let mut status = json!({"authenticated": true, "user": user});
    if !audiences.is_empty() {
        status["audiences"] = json!(audiences);
    }
    status
}

fn rejected(reason: String) -> Value {
    json!({"authenticated": false, "user": {}, "error": format!("[invalid bearer token, {reason}]")})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<KnownToken> {
        let text = "
- token: t1
  username: system:serviceaccount:shop:client
  uid: u1
  groups: [system:serviceaccounts]
  extra: {authentication.kubernetes.io/pod-name: [client]}
  audiences: [istio-ca]
- token: t2
  username: alice
- token: t3
  username: bob
  expiresAt: 2030-01-01T00:00:00Z
";
        match serde_yaml_ng::from_str(text) {
            Ok(tokens) => tokens,
            Err(e) => panic!("{e}"),
        }
    }

    fn status(token: &str, audiences: &[&str]) -> Value {
        status_at(token, audiences, Timestamp::now())
    }

    fn status_at(token: &str, audiences: &[&str], now: Timestamp) -> Value {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences}});
        match review_at(&known(), body.to_string().as_bytes(), now) {
            Ok(review) => review["status"].clone(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn known_tokens_authenticate_within_their_audiences() {
        let client = status("t1", &[]);
        assert_eq!(client["authenticated"], true);
        assert_eq!(
            client["user"]["username"],
            "system:serviceaccount:shop:client"
        );
        assert_eq!(client["user"]["uid"], "u1");
        assert_eq!(
            client["user"]["extra"]["authentication.kubernetes.io/pod-name"],
            json!(["client"])
        );
        assert_eq!(client["audiences"], json!(["istio-ca"]));

        assert_eq!(
            status("t1", &["other", "istio-ca"])["audiences"],
            json!(["istio-ca"])
        );
        assert_eq!(status("t1", &["other"])["authenticated"], false);
        assert_eq!(status("t2", &["any"])["audiences"], json!(["any"]));
    }

    #[test]
    fn unknown_tokens_do_not() {
        let unknown = status("nope", &[]);
        assert_eq!(unknown["authenticated"], false);
        assert!(
            unknown["error"]
                .as_str()
                .is_some_and(|e| e.contains("invalid bearer token"))
        );
    }

    #[test]
    fn expired_tokens_do_not() {
        let at = |text: &str| match text.parse::<Timestamp>() {
            Ok(time) => time,
            Err(e) => panic!("{e}"),
        };
        let before = status_at("t3", &[], at("2029-12-31T23:59:59Z"));
        assert_eq!(before["authenticated"], true);
        let after = status_at("t3", &[], at("2030-01-01T00:00:00Z"));
        assert_eq!(after["authenticated"], false);
        assert_eq!(after["error"], "[invalid bearer token, token has expired]");
    }
}
