//! Puts ambit's chained CNI plugin, `ambit-cni`, at the end of the node's primary network
//! chain, as istio-cni does, so that it runs after the primary CNI on every pod ADD; and takes
//! it out again.
//!
//! [`CniConfDir`] finds the configuration the container runtime loads (the first `.conflist`,
//! `.conf` or `.json` by name that parses), appends a [`PluginEntry`], keeps it there while the
//! primary CNI rewrites its file ([`CniConfDir::watch`]), and removes it. [`CniBinDir`] holds
//! the plugin's binary. The edits themselves are pure (`conflist`); `files` does the I/O.
//! [`KubeconfigSource`] says where the plugin's kubeconfig comes from: a file, or this pod's
//! service account, whose token the watch keeps current.

mod command;
mod conflist;
mod files;
mod kubeconfig;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::drain::DrainWatcher;
use crate::error_chain::ErrorChain;
use conflist::{FileKind, PLUGIN_TYPE};

pub use command::CniArgs;
pub use conflist::NetworkConfigError;
pub use kubeconfig::{ApiServerUrl, KubeconfigSource};

/// The name of the kubeconfig we keep for the plugin in the configuration directory; the `ZZZ`
/// sorts it last, and without a configuration extension the runtime never loads it.
const KUBECONFIG_NAME: &str = "ZZZ-ambit-cni-kubeconfig";

/// The settings of ambit's entry in the chain, as the plugin reads them on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginEntry {
    /// The agent's socket, which the plugin tells of each pod it sets up.
    pub agent_socket: PathBuf,
    /// The kubeconfig the plugin reads, if it talks to the API server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the plugin logs, if not to the runtime's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
}

impl PluginEntry {
    /// The entry as it stands in the `plugins` list.
    fn to_json(&self) -> Result<Value, CniInstallError> {
        let mut json = serde_json::to_value(self).map_err(CniInstallError::EncodeEntry)?;
        if let Value::Object(members) = &mut json {
            members.insert("type".to_owned(), PLUGIN_TYPE.into());
        }
        Ok(json)
    }
}

/// What installing into the configuration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// Our entry was already the last plugin, with these settings; nothing was written.
    Unchanged(PathBuf),
    /// The list was rewritten with our entry last.
    Inserted(PathBuf),
    /// A single-plugin file became a list ending in our entry.
    Converted { from: PathBuf, to: PathBuf },
}

/// Why installing or removing the plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error("failed to read the CNI configuration directory {}", dir.display())]
    ReadConfDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no CNI network configuration in {} yet", dir.display())]
    NoNetwork { dir: PathBuf },
    #[error("failed to parse {}", path.display())]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: NetworkConfigError,
    },
    #[error("failed to encode the ambit-cni entry")]
    EncodeEntry(#[source] serde_json::Error),
    #[error("failed to read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KUBERNETES_SERVICE_HOST={host:?} is neither an IP address nor a DNS name")]
    ApiServerHost { host: String },
    #[error("KUBERNETES_SERVICE_PORT={port:?} is not a TCP port")]
    ApiServerPort { port: String },
    #[error("the service account token {} is {reason}", path.display())]
    ServiceAccountToken { path: PathBuf, reason: &'static str },
    #[error("failed to encode the ambit-cni kubeconfig")]
    EncodeKubeconfig(#[source] serde_yaml_ng::Error),
    #[error("failed to lock {}", dir.display())]
    LockDir {
        dir: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("failed to remove {}", path.display())]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory the container runtime reads network configurations from (`/etc/cni/net.d`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfDir(PathBuf);

impl CniConfDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Makes `entry` the one plugin of ours, last in the primary network's chain; writes
    /// nothing when it already is.
    pub fn install(&self, entry: &PluginEntry) -> Result<ConfigChange, CniInstallError> {
        let file = files::primary(&self.0)?;
        let config = file.parse()?;
        let Some(text) = config
            .with_plugin(&entry.to_json()?)
            .map_err(CniInstallError::EncodeEntry)?
        else {
            return Ok(ConfigChange::Unchanged(file.path));
        };
        let mode = files::mode(&file.path)?;
        match file.kind {
            FileKind::List => {
                files::write_atomically(&file.path, text.as_bytes(), mode)?;
                Ok(ConfigChange::Inserted(file.path))
            }
            FileKind::Single => {
                // istio-cni writes the list over the `.conf` and then renames it to
                // `.conflist`, so for a moment the `.conf` holds a list, which the runtime
                // cannot load as a `.conf`. Here the list goes to its own file first: while
                // both exist the runtime still loads the old `.conf` (`x.conf` sorts before
                // `x.conflist`), pods set up meanwhile just miss our plugin, and once the
                // `.conf` is gone the runtime loads the list. Interrupted in between, the next
                // install finds the `.conf` first again and finishes the job.
                let list = file.path.with_extension("conflist");
                files::write_atomically(&list, text.as_bytes(), mode)?;
                files::remove(&file.path)?;
                Ok(ConfigChange::Converted {
                    from: file.path,
                    to: list,
                })
            }
        }
    }

    /// Takes our entry out of every list in the directory that has one, the primary network's
    /// and any it was before; returns the files rewritten. A list converted from a `.conf`
    /// stays a list, which the runtime loads just the same.
    pub fn uninstall(&self) -> Result<Vec<PathBuf>, CniInstallError> {
        let mut rewritten = Vec::new();
        for (path, kind) in files::config_paths(&self.0)? {
            let Some(file) = files::read_config(path, kind) else {
                continue;
            };
            // A file that does not parse has no entry of ours we could have written.
            let Ok(config) = file.parse() else {
                continue;
            };
            if let Some(text) = config
                .without_plugin()
                .map_err(CniInstallError::EncodeEntry)?
            {
                files::write_atomically(&file.path, text.as_bytes(), files::mode(&file.path)?)?;
                rewritten.push(file.path);
            }
        }
        Ok(rewritten)
    }

    /// Whether the primary network's chain has our plugin at all.
    pub fn has_plugin(&self) -> Result<bool, CniInstallError> {
        let file = files::primary(&self.0)?;
        Ok(file.parse()?.has_plugin())
    }

    /// The path of the kubeconfig [`Self::install_kubeconfig`] keeps for the plugin.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.0.join(KUBECONFIG_NAME)
    }

    /// Writes the kubeconfig from `source` to [`Self::kubeconfig_path`], readable by root
    /// alone, when it differs from what is there; tells whether it wrote.
    pub fn install_kubeconfig(&self, source: &KubeconfigSource) -> Result<bool, CniInstallError> {
        files::write_if_changed(&self.kubeconfig_path(), &source.contents()?, 0o600)
    }

    /// Removes our kubeconfig; tells whether it was there.
    pub fn remove_kubeconfig(&self) -> Result<bool, CniInstallError> {
        files::remove(&self.kubeconfig_path())
    }

    /// Keeps `entry` installed until `drain` fires: checks every `interval`, since the
    /// primary CNI (Calico, Cilium, ...) may rewrite its file at any time, and puts the entry
    /// back when it is missing or changed. Keeps the kubeconfig from `kubeconfig` current too,
    /// for a rotated token: a few small reads and a comparison per check. Stops putting things
    /// back once `ambit cni uninstall` has removed them. Failures (no network configured yet)
    /// are logged once and retried.
    pub async fn watch(
        self,
        entry: PluginEntry,
        bin_dir: CniBinDir,
        kubeconfig: Option<KubeconfigSource>,
        interval: Duration,
        mut drain: DrainWatcher,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut entry_warning = Warning::new("failed to install the ambit-cni plugin");
        let mut kubeconfig_warning = Warning::new("failed to update the ambit-cni kubeconfig");
        loop {
            tokio::select! {
                biased;
                () = drain.signaled() => return,
                _ = ticks.tick() => {}
            }
            let (dir, settings, bin, source) = (
                self.clone(),
                entry.clone(),
                bin_dir.clone(),
                kubeconfig.clone(),
            );
            let kept =
                tokio::task::spawn_blocking(move || dir.keep(&settings, &bin, source.as_ref()))
                    .await
                    .map_err(|error| ErrorChain(&error).to_string())
                    .and_then(|kept| kept.map_err(|error| ErrorChain(&error).to_string()));
            match kept {
                Ok(Kept::Uninstalled) => {
                    tracing::info!(
                        dir = %self.0.display(),
                        "ambit-cni was uninstalled; no longer keeping it in the chain"
                    );
                    drain.signaled().await;
                    return;
                }
                Ok(Kept::Checked { kubeconfig, entry }) => {
                    if let Some(written) = kubeconfig {
                        let written = written.map(|written| {
                            if written {
                                tracing::info!(file = %self.kubeconfig_path().display(), "ambit-cni kubeconfig updated");
                            }
                        });
                        kubeconfig_warning.update(written);
                    }
                    entry_warning.update(entry.map(|change| log_change(&change)));
                }
                Err(error) => entry_warning.update(Err(error)),
            }
        }
    }

    /// One check of the watch, with the directory locked against `ambit cni uninstall`: the
    /// kubeconfig first, as at install, since the entry names it; then the entry. Nothing when
    /// both the binary and the entry are gone: that is an uninstall, not a primary CNI's
    /// rewrite, which never touches the binary.
    fn keep(
        &self,
        entry: &PluginEntry,
        bin_dir: &CniBinDir,
        kubeconfig: Option<&KubeconfigSource>,
    ) -> Result<Kept, CniInstallError> {
        let _lock = self.lock()?;
        if !bin_dir.plugin_path().exists() && !self.has_plugin().unwrap_or(false) {
            return Ok(Kept::Uninstalled);
        }
        let text = |error: CniInstallError| ErrorChain(&error).to_string();
        Ok(Kept::Checked {
            kubeconfig: kubeconfig.map(|source| self.install_kubeconfig(source).map_err(text)),
            entry: self.install(entry).map_err(text),
        })
    }

    /// Locks the directory, as the watch does for each check, until the guard is dropped: an
    /// uninstall holds it so that the watch cannot put back what it is removing.
    pub fn lock(&self) -> Result<ConfDirLock, CniInstallError> {
        files::lock_dir(&self.0).map(ConfDirLock)
    }
}

/// [`CniConfDir::lock`]'s guard.
#[derive(Debug)]
pub struct ConfDirLock(#[expect(dead_code, reason = "held for its drop")] files::DirLock);

/// What one check of the watch found.
enum Kept {
    Uninstalled,
    Checked {
        kubeconfig: Option<Result<bool, String>>,
        entry: Result<ConfigChange, String>,
    },
}

/// A failure of the watch, logged when it first happens or changes, not on every check.
struct Warning {
    message: &'static str,
    last: Option<String>,
}

impl Warning {
    fn new(message: &'static str) -> Self {
        Self {
            message,
            last: None,
        }
    }

    fn update(&mut self, result: Result<(), String>) {
        let error = result.err();
        if error.is_some() && error != self.last {
            tracing::warn!(error = error.as_deref(), "{}", self.message);
        }
        self.last = error;
    }
}

/// One line per write to the runtime's configuration.
fn log_change(change: &ConfigChange) {
    match change {
        ConfigChange::Unchanged(_) => {}
        ConfigChange::Inserted(path) => {
            tracing::info!(file = %path.display(), "ambit-cni plugin inserted at the end of the chain");
        }
        ConfigChange::Converted { from, to } => tracing::info!(
            file = %to.display(),
            from = %from.display(),
            "ambit-cni plugin inserted; the single-plugin configuration became a list",
        ),
    }
}

/// The directory the container runtime runs CNI plugins from (`/opt/cni/bin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniBinDir(PathBuf);

impl CniBinDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// Where the runtime finds ambit's plugin: the directory and the plugin's `type`.
    pub fn plugin_path(&self) -> PathBuf {
        self.0.join(PLUGIN_TYPE)
    }

    /// Copies the plugin binary at `source` into the directory, mode 0755, replacing the old
    /// one in one step, when the contents differ; tells whether it wrote.
    pub fn install_plugin(&self, source: &Path) -> Result<bool, CniInstallError> {
        let contents = std::fs::read(source).map_err(|error| CniInstallError::ReadFile {
            path: source.to_owned(),
            source: error,
        })?;
        files::write_if_changed(&self.plugin_path(), &contents, 0o755)
    }

    /// Removes the plugin binary; tells whether it was there.
    pub fn remove_plugin(&self) -> Result<bool, CniInstallError> {
        files::remove(&self.plugin_path())
    }
}
