//! Query parameters of list, watch and write requests.

use std::collections::HashMap;

use super::routes::Target;
use super::selectors::{FieldSelector, LabelSelector, Selection};
use super::status::Refusal;

#[derive(Debug, Default)]
pub(super) struct Query {
    pub(super) watch: bool,
    pub(super) resource_version: Option<String>,
    pub(super) resource_version_match: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    pub(super) limit: Option<usize>,
    pub(super) continue_token: Option<String>,
    pub(super) timeout_seconds: Option<u64>,
    pub(super) allow_watch_bookmarks: bool,
    pub(super) field_manager: Option<String>,
}

impl Query {
    pub(super) fn parse(query: Option<&str>) -> Result<Self, Refusal> {
        let params: HashMap<String, String> =
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let text = |name: &str| params.get(name).filter(|v| !v.is_empty()).cloned();
        let flag = |name: &str| matches!(params.get(name).map(String::as_str), Some("true" | "1"));
        let number = |name: &str| {
            text(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| Refusal::bad_request(format!("{name}: invalid value {v:?}")))
                })
                .transpose()
        };
        Ok(Self {
            watch: flag("watch"),
            resource_version: text("resourceVersion"),
            resource_version_match: text("resourceVersionMatch"),
            label_selector: text("labelSelector"),
            field_selector: text("fieldSelector"),
            limit: number("limit")?
                .and_then(|l| usize::try_from(l).ok())
                .filter(|l| *l > 0),
            continue_token: text("continue"),
            timeout_seconds: number("timeoutSeconds")?,
            allow_watch_bookmarks: flag("allowWatchBookmarks"),
            field_manager: text("fieldManager"),
        })
    }

    /// What a list or watch of `target` selects.
    pub(super) fn selection(&self, target: &Target) -> Result<Selection, Refusal> {
        let labels = match &self.label_selector {
            Some(text) => {
                LabelSelector::parse(text).map_err(|e| Refusal::bad_request(e.to_string()))?
            }
            None => LabelSelector::default(),
        };
        let fields = match &self.field_selector {
            Some(text) => FieldSelector::parse(text, target.resource.resource())
                .map_err(|e| Refusal::bad_request(e.to_string()))?,
            None => FieldSelector::default(),
        };
        Ok(Selection {
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }
}
