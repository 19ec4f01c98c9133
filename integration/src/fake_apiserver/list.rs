//! Lists, paged with `limit` and `continue`: every page is cut from the snapshot at the first
//! page's version, as a real API server serves them from etcd.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::query::Query;
use super::routes::Target;
use super::state::State;
use super::status::Refusal;
use super::store::Version;

/// A real server's message for a continue token past the history.
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter.";

/// Where a paged list continues: the list's version and the last key served.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ContinueToken {
    #[serde(rename = "v")]
    format: String,
    #[serde(rename = "rv")]
    version: Version,
    /// `namespace/name` of the last object served.
    start: String,
}

const TOKEN_FORMAT: &str = "meta.k8s.io/v1";

impl ContinueToken {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(text: &str) -> Result<Self, Refusal> {
        let invalid = || Refusal::bad_request(format!("continue key is not valid: {text:?}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| invalid())?;
        let token: Self = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if token.format != TOKEN_FORMAT {
            return Err(invalid());
        }
        Ok(token)
    }
}

/// The list `target` and `query` ask for, as a `{Kind}List`.
pub(super) fn list(state: &State, target: &Target, query: &Query) -> Result<Value, Refusal> {
    let selection = query.selection(target)?;
    let continuation = query
        .continue_token
        .as_deref()
        .map(ContinueToken::decode)
        .transpose()?;
    let store = state.store();
    let version = match &continuation {
        Some(token) => token.version,
        None => requested_version(query, store.latest())?,
    };
    let snapshot =
        store
            .snapshot(target.resource, version)
            .map_err(|too_old| match continuation {
                Some(_) => Refusal::expired(CONTINUE_EXPIRED),
                None => Refusal::too_old(version, too_old.oldest),
            })?;
    drop(store);

    let start = continuation.map(|token| token.start);
    let mut matching = snapshot
        .iter()
        .filter(|(key, _)| {
            start
                .as_deref()
                .is_none_or(|start| position(&key.namespace, &key.name).as_str() > start)
        })
        .filter(|(_, object)| selection.matches(object));
    let limit = query.limit.unwrap_or(usize::MAX);
    let page: Vec<_> = matching.by_ref().take(limit).collect();
    let remaining = matching.count();

    let mut metadata = json!({"resourceVersion": version.to_string()});
    if let (Some((last, _)), true) = (page.last(), remaining > 0) {
        let token = ContinueToken {
            format: TOKEN_FORMAT.to_owned(),
            version,
            start: position(&last.namespace, &last.name),
        };
        metadata["continue"] = json!(token.encode());
        metadata["remainingItemCount"] = json!(remaining);
    }
    let resource = target.resource.resource();
    Ok(json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version(&target.version),
        "metadata": metadata,
        "items": page.into_iter().map(|(_, object)| object).collect::<Vec<_>>(),
    }))
}

/// The version a first page is served at: the latest, unless the request wants an exact one.
fn requested_version(query: &Query, latest: Version) -> Result<Version, Refusal> {
    let exact = query.resource_version_match.as_deref() == Some("Exact");
    match query.resource_version.as_deref() {
        Some(text) if exact => {
            let version: Version = text.parse().map_err(|_| {
                Refusal::bad_request(format!("resourceVersion: invalid value {text:?}"))
            })?;
            if version > latest {
                return Err(Refusal::too_old(version, latest));
            }
            Ok(version)
        }
        _ => Ok(latest),
    }
}

/// Where an object sits in a list: keys sort by namespace, then name.
fn position(namespace: &str, name: &str) -> String {
    // NUL sorts before every character of a name, so `a/x` < `ab/x` as (`a`, `x`) < (`ab`, `x`).
    format!("{namespace}\u{0}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = ContinueToken {
            format: TOKEN_FORMAT.into(),
            version: 42,
            start: position("shop", "web"),
        };
        assert_eq!(ContinueToken::decode(&token.encode()), Ok(token));
        assert!(ContinueToken::decode("not a token").is_err());
        assert!(ContinueToken::decode(&URL_SAFE_NO_PAD.encode("{}")).is_err());
    }

    #[test]
    fn positions_sort_as_keys() {
        assert!(position("a", "x") < position("ab", "x"));
        assert!(position("a", "x") < position("a", "y"));
    }
}
