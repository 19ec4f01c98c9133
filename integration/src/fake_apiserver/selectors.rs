//! Label and field selectors, with the grammar and messages of `k8s.io/apimachinery`.

use serde_json::Value;

use super::resources::Resource;

/// A selector the request got wrong; the message is what a real server answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct SelectorError(String);

/// A `labelSelector`: requirements that must all hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LabelSelector(Vec<LabelRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    pub(super) fn parse(text: &str) -> Result<Self, SelectorError> {
        split_top_level(text)
            .into_iter()
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                LabelRequirement::parse(part)
                    .ok_or_else(|| SelectorError(format!("unable to parse requirement: {part:?}")))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

impl LabelRequirement {
    fn parse(text: &str) -> Option<Self> {
        if let Some(key) = text.strip_prefix('!') {
            let key = key.trim();
            return is_label_key(key).then(|| Self::DoesNotExist(key.to_owned()));
        }
        let key_end = text.find(|c: char| !is_key_char(c)).unwrap_or(text.len());
        let (key, rest) = text.split_at(key_end);
        if !is_label_key(key) {
            return None;
        }
        let key = key.to_owned();
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Some(Self::Exists(key));
        }
        if let Some(value) = rest.strip_prefix("!=") {
            return label_value(value).map(|v| Self::NotEquals(key, v));
        }
        if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            return label_value(value).map(|v| Self::Equals(key, v));
        }
        if let Some(values) = rest.strip_prefix("notin") {
            return value_set(values).map(|vs| Self::NotIn(key, vs));
        }
        if let Some(values) = rest.strip_prefix("in") {
            return value_set(values).map(|vs| Self::In(key, vs));
        }
        None
    }
}

/// Splits at the commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn is_label_key(key: &str) -> bool {
    !key.is_empty() && key.chars().all(is_key_char)
}

fn label_value(text: &str) -> Option<String> {
    let value = text.trim();
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    valid.then(|| value.to_owned())
}

/// `(a, b)` after `in` or `notin`.
fn value_set(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(label_value).collect()
}

/// A `fieldSelector`: `field=value`, `field==value` and `field!=value`, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldSelector(Vec<FieldRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

impl FieldSelector {
    /// Parses `text` for `resource`, refusing fields the real server does not index.
    pub(super) fn parse(text: &str, resource: &Resource) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, value, equal) = if let Some((path, value)) = part.split_once("!=") {
                (path, value, false)
            } else if let Some((path, value)) = part.split_once("==") {
                (path, value, true)
            } else if let Some((path, value)) = part.split_once('=') {
                (path, value, true)
            } else {
                return Err(SelectorError(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                )));
            };
            let path = path.trim();
            let supported = matches!(path, "metadata.name" | "metadata.namespace")
                || resource.field_labels.contains(&path);
            if !supported {
                return Err(SelectorError(format!("field label not supported: {path}")));
            }
            requirements.push(FieldRequirement {
                path: path.to_owned(),
                value: value.trim().to_owned(),
                equal,
            });
        }
        Ok(Self(requirements))
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|r| (field_value(object, &r.path) == r.value) == r.equal)
    }
}

/// A field as field selectors see it: absent fields are empty strings.
fn field_value(object: &Value, path: &str) -> String {
    let field = path
        .split('.')
        .try_fold(object, |value, segment| value.get(segment));
    match field {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// What a list or watch request selects.
#[derive(Debug, Clone, Default)]
pub(super) struct Selection {
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
}

impl Selection {
    /// Whether `object` (stored, with its metadata) is selected.
    pub(super) fn matches(&self, object: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::resources::ResourceId;
    use super::*;

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": node}})
    }

    fn labels(text: &str) -> LabelSelector {
        match LabelSelector::parse(text) {
            Ok(selector) => selector,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn every_label_operator() {
        let web = pod(json!({"app": "web", "tier": "front"}), "n1");
        for (selector, expected) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app in (db)", false),
            ("app notin (db,cache)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("ambient.istio.io/redirection", false),
            ("", true),
        ] {
            assert_eq!(labels(selector).matches(&web), expected, "{selector}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_refused() {
        for selector in ["app in web", "app=(x", "=web", "app in (a b)", "app>1"] {
            assert!(LabelSelector::parse(selector).is_err(), "{selector}");
        }
    }

    #[test]
    fn field_selectors_on_pods() {
        let Some(pods) = ResourceId::by_kind("v1", "Pod") else {
            panic!("pods are served");
        };
        let select = |text| match FieldSelector::parse(text, pods.resource()) {
            Ok(selector) => selector,
            Err(e) => panic!("{text}: {e}"),
        };
        let on_n1 = pod(json!({}), "n1");
        assert!(select("spec.nodeName=n1").matches(&on_n1));
        assert!(select("spec.nodeName==n1,metadata.namespace=ns").matches(&on_n1));
        assert!(!select("spec.nodeName!=n1").matches(&on_n1));
        assert!(select("status.phase=").matches(&on_n1));
        assert_eq!(
            FieldSelector::parse("spec.foo=x", pods.resource()),
            Err(SelectorError("field label not supported: spec.foo".into()))
        );
        assert!(FieldSelector::parse("nonsense", pods.resource()).is_err());
    }
}
