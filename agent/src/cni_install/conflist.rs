//! A CNI network configuration as text: where ambit's plugin sits in the chain, and the file
//! with it put last or taken out, every other member kept as it was written.
//!
//! The file is parsed into its members in their order, each kept as the exact text it had
//! ([`RawValue`]), so a rewrite changes nothing but the `plugins` list: the other plugins keep
//! their keys, their order and their formatting, and the workspace's `serde_json` keeps its
//! sorted `Map` (no `preserve_order`).

use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The `type` of ambit's chained plugin, and the name of its binary.
pub(super) const PLUGIN_TYPE: &str = "ambit-cni";

/// How the container runtime reads a file; its extension decides, as in libcni.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    /// A `.conflist`: `name`, `cniVersion` and a chain of `plugins`.
    List,
    /// A `.conf` or `.json`: a single plugin, run as a chain of one.
    Single,
}

impl FileKind {
    pub(super) fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "conflist" => Some(Self::List),
            "conf" | "json" => Some(Self::Single),
            _ => None,
        }
    }
}

/// Why a file is not a network configuration the runtime would load.
#[derive(Debug, thiserror::Error)]
pub enum NetworkConfigError {
    #[error("not a JSON object")]
    Object(#[source] serde_json::Error),
    #[error("no \"plugins\" list")]
    MissingPlugins,
    #[error("\"plugins\" is not a list")]
    Plugins(#[source] serde_json::Error),
    #[error("plugin {index} has no \"type\"")]
    PluginType {
        index: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("no \"type\"")]
    Type(#[source] serde_json::Error),
}

/// A parsed configuration file, borrowing the text of its members from the file.
#[derive(Debug)]
pub(super) enum NetworkConfig<'a> {
    List {
        members: RawObject<'a>,
        plugins: Vec<Plugin<'a>>,
    },
    Single {
        members: RawObject<'a>,
        kind: String,
    },
}

/// One plugin of a chain: its text and its `type`.
#[derive(Debug)]
pub(super) struct Plugin<'a> {
    text: &'a RawValue,
    kind: String,
}

impl Plugin<'_> {
    fn is_ours(&self) -> bool {
        self.kind == PLUGIN_TYPE
    }
}

/// The `type` member of a plugin; the rest is the plugin's business.
#[derive(Deserialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: String,
}

impl<'a> NetworkConfig<'a> {
    pub(super) fn parse(text: &'a str, kind: FileKind) -> Result<Self, NetworkConfigError> {
        let members: RawObject<'a> =
            serde_json::from_str(text).map_err(NetworkConfigError::Object)?;
        match kind {
            FileKind::List => {
                let list = members
                    .member("plugins")
                    .ok_or(NetworkConfigError::MissingPlugins)?;
                let texts: Vec<&'a RawValue> =
                    serde_json::from_str(list.get()).map_err(NetworkConfigError::Plugins)?;
                let plugins = texts
                    .into_iter()
                    .enumerate()
                    .map(|(index, text)| {
                        let typed: Typed = serde_json::from_str(text.get())
                            .map_err(|source| NetworkConfigError::PluginType { index, source })?;
                        Ok(Plugin {
                            text,
                            kind: typed.kind,
                        })
                    })
                    .collect::<Result<_, NetworkConfigError>>()?;
                Ok(Self::List { members, plugins })
            }
            FileKind::Single => {
                let typed: Typed = serde_json::from_str(text).map_err(NetworkConfigError::Type)?;
                Ok(Self::Single {
                    members,
                    kind: typed.kind,
                })
            }
        }
    }

    /// Whether the runtime would run this as the node's network: some plugin besides ours.
    pub(super) fn is_network(&self) -> bool {
        match self {
            Self::List { plugins, .. } => plugins.iter().any(|plugin| !plugin.is_ours()),
            Self::Single { kind, .. } => kind != PLUGIN_TYPE,
        }
    }

    /// Whether ambit's plugin is anywhere in the chain.
    pub(super) fn has_plugin(&self) -> bool {
        match self {
            Self::List { plugins, .. } => plugins.iter().any(Plugin::is_ours),
            Self::Single { .. } => false,
        }
    }

    /// The configuration with `entry` as the one plugin of ours, last in the chain; `None` when
    /// it already is. A single-plugin file comes back as a list: the plugin, then ours.
    pub(super) fn with_plugin(&self, entry: &Value) -> Result<Option<String>, serde_json::Error> {
        match self {
            Self::List { members, plugins } => {
                let ours: Vec<&Plugin<'_>> = plugins.iter().filter(|p| p.is_ours()).collect();
                if let ([only], Some(last)) = (ours.as_slice(), plugins.last())
                    && last.is_ours()
                    && serde_json::from_str::<Value>(only.text.get())? == *entry
                {
                    return Ok(None);
                }
                let mut chain = others(plugins);
                chain.push(Out::Value(entry));
                render(members, chain).map(Some)
            }
            Self::Single { members, .. } => {
                // The list takes the network's name and version; the plugin keeps the rest.
                let header = ["cniVersion", "name"];
                let mut list: Vec<(&str, Out<'_>)> = header
                    .iter()
                    .filter_map(|&key| Some((key, Out::Raw(members.member(key)?))))
                    .collect();
                let plugin = members
                    .0
                    .iter()
                    .filter(|(key, _)| !header.contains(&key.as_str()))
                    .map(|(key, text)| (key.as_str(), Out::Raw(text)))
                    .collect();
                list.push((
                    "plugins",
                    Out::List(vec![Out::Object(plugin), Out::Value(entry)]),
                ));
                pretty(&Out::Object(list)).map(Some)
            }
        }
    }

    /// The configuration without any plugin of ours; `None` when it has none.
    pub(super) fn without_plugin(&self) -> Result<Option<String>, serde_json::Error> {
        match self {
            Self::List { members, plugins } if plugins.iter().any(Plugin::is_ours) => {
                render(members, others(plugins)).map(Some)
            }
            Self::List { .. } | Self::Single { .. } => Ok(None),
        }
    }
}

/// The plugins of the chain that are not ours, as they were written.
fn others<'a>(plugins: &'a [Plugin<'a>]) -> Vec<Out<'a>> {
    plugins
        .iter()
        .filter(|plugin| !plugin.is_ours())
        .map(|plugin| Out::Raw(plugin.text))
        .collect()
}

/// The file's members in their order, with `plugins` replaced by `chain`.
fn render<'a>(
    members: &'a RawObject<'a>,
    chain: Vec<Out<'a>>,
) -> Result<String, serde_json::Error> {
    let mut chain = Some(chain);
    let members = members
        .0
        .iter()
        .map(
            |(key, text)| match (key.as_str(), chain.take_if(|_| key == "plugins")) {
                (key, Some(chain)) => (key, Out::List(chain)),
                (key, None) => (key, Out::Raw(text)),
            },
        )
        .collect();
    pretty(&Out::Object(members))
}

/// Two-space indentation, as `cni` tools and most network plugins write their files, and a
/// final newline. Members kept as text come out exactly as they were read.
fn pretty(document: &Out<'_>) -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string_pretty(document)?;
    text.push('\n');
    Ok(text)
}

/// A JSON object's members in the order the file has them, each value as its exact text.
#[derive(Debug)]
pub(super) struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'a> RawObject<'a> {
    /// The value of `key`; the last one wins if a file repeats it, as in Go's `encoding/json`.
    fn member(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|&(_, text)| text)
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;

        impl<'de> Visitor<'de> for Members {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(RawObject(members))
            }
        }

        deserializer.deserialize_map(Members)
    }
}

/// A document to write: text kept from the file, ambit's entry, and the lists and objects
/// that hold them.
enum Out<'a> {
    Raw(&'a RawValue),
    Value(&'a Value),
    List(Vec<Out<'a>>),
    Object(Vec<(&'a str, Out<'a>)>),
}

impl Serialize for Out<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Raw(text) => text.serialize(serializer),
            Self::Value(value) => value.serialize(serializer),
            Self::List(items) => items.serialize(serializer),
            Self::Object(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (key, value) in members {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}
