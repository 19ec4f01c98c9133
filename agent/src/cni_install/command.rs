//! `ambit cni`: installs the plugin's binary and its entry in the node's network chain, keeps
//! the entry there with `--watch`, and removes both.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    ApiServerUrl, CniBinDir, CniConfDir, ConfigChange, KubeconfigSource, PluginEntry, log_change,
};
use crate::config::LogFormat;
use crate::{drain, logging};

/// How often `--watch` checks the configuration.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct CniArgs {
    #[command(subcommand)]
    command: CniCommand,
}

#[derive(Debug, Subcommand)]
enum CniCommand {
    /// Copy the plugin binary and put the plugin last in the primary network's chain.
    Install(InstallArgs),
    /// Take the plugin out of every chain, and remove its binary and kubeconfig.
    Uninstall(Dirs),
}

/// Where the runtime keeps CNI configurations and plugins, as this process sees them.
#[derive(Debug, Args)]
struct Dirs {
    /// The CNI configuration directory.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The CNI plugin binary directory.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
}

#[derive(Debug, Args)]
struct InstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// The `ambit-cni` binary to copy into --bin-dir.
    #[arg(long, env = "AMBIT_CNI_PLUGIN_BINARY")]
    plugin_binary: PathBuf,
    /// The agent's socket on the host, which the plugin calls.
    #[arg(
        long,
        env = "AMBIT_CNI_AGENT_SOCKET",
        default_value = "/var/run/ambit/cni.sock"
    )]
    agent_socket: PathBuf,
    /// A kubeconfig for the plugin, copied into --conf-dir (and copied again when it changes,
    /// with --watch); none by default.
    #[arg(long, env = "AMBIT_CNI_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Instead of --kubeconfig, write one into --conf-dir from the service account of the pod
    /// this runs in: the API server at KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, the
    /// CA and token in /var/run/secrets/kubernetes.io/serviceaccount. With --watch it is
    /// rewritten when the kubelet rotates the token.
    #[arg(
        long,
        env = "AMBIT_CNI_KUBECONFIG_FROM_SERVICE_ACCOUNT",
        default_value_t = false,
        conflicts_with = "kubeconfig"
    )]
    kubeconfig_from_service_account: bool,
    /// --conf-dir as the runtime sees it on the host, for the kubeconfig's path in the
    /// plugin's entry, when this runs in a container with the host's directory mounted
    /// elsewhere; --conf-dir by default.
    #[arg(long, env = "AMBIT_CNI_HOST_CONF_DIR")]
    host_conf_dir: Option<PathBuf>,
    /// A file on the host for the plugin's log; the runtime's log by default.
    #[arg(long, env = "AMBIT_CNI_LOG_FILE")]
    log_file: Option<PathBuf>,
    /// Keep the plugin in the chain until SIGTERM, checking every second.
    #[arg(long, env = "AMBIT_CNI_WATCH", default_value_t = false)]
    watch: bool,
}

impl CniArgs {
    /// Runs the command and tells the process how it went.
    pub fn run(self) -> ExitCode {
        let (_, _flush) = logging::init(LogFormat::Text);
        match self.command {
            CniCommand::Install(args) if args.watch => {
                crate::cli::block_on(install_and_watch(args))
            }
            CniCommand::Install(args) => finish(install(&args).map(|_| ())),
            CniCommand::Uninstall(dirs) => finish(uninstall(&dirs)),
        }
    }
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

impl InstallArgs {
    /// Where the plugin's kubeconfig comes from, if it has one.
    fn kubeconfig_source(&self) -> anyhow::Result<Option<KubeconfigSource>> {
        if let Some(path) = &self.kubeconfig {
            return Ok(Some(KubeconfigSource::File(path.clone())));
        }
        if !self.kubeconfig_from_service_account {
            return Ok(None);
        }
        let variable = |name: &str| {
            std::env::var(name).with_context(|| {
                format!("--kubeconfig-from-service-account needs {name}: is this running in a pod?")
            })
        };
        let server = ApiServerUrl::new(
            &variable("KUBERNETES_SERVICE_HOST")?,
            &variable("KUBERNETES_SERVICE_PORT")?,
        )
        .context("--kubeconfig-from-service-account")?;
        Ok(Some(KubeconfigSource::in_cluster(server)))
    }
}

/// What the watch keeps in place.
struct Installed {
    conf_dir: CniConfDir,
    bin_dir: CniBinDir,
    entry: PluginEntry,
    kubeconfig: Option<KubeconfigSource>,
}

/// The binary first, so that no entry ever names a plugin the runtime cannot find; then the
/// kubeconfig, which the entry names.
fn install_files(args: &InstallArgs) -> anyhow::Result<Installed> {
    // Before anything is written: a bad setting leaves the node as it was.
    let kubeconfig = args.kubeconfig_source()?;
    let bin_dir = CniBinDir::new(&args.dirs.bin_dir);
    if bin_dir
        .install_plugin(&args.plugin_binary)
        .context("installing the ambit-cni binary")?
    {
        tracing::info!(file = %bin_dir.plugin_path().display(), "ambit-cni binary installed");
    }
    let conf_dir = CniConfDir::new(&args.dirs.conf_dir);
    let host_kubeconfig = match &kubeconfig {
        Some(source) => {
            if conf_dir
                .install_kubeconfig(source)
                .context("installing the ambit-cni kubeconfig")?
            {
                tracing::info!(file = %conf_dir.kubeconfig_path().display(), "ambit-cni kubeconfig installed");
            }
            let host_dir =
                CniConfDir::new(args.host_conf_dir.as_ref().unwrap_or(&args.dirs.conf_dir));
            Some(host_dir.kubeconfig_path())
        }
        None => None,
    };
    let entry = PluginEntry {
        agent_socket: args.agent_socket.clone(),
        kubeconfig: host_kubeconfig,
        log_file: args.log_file.clone(),
    };
    Ok(Installed {
        conf_dir,
        bin_dir,
        entry,
        kubeconfig,
    })
}

fn install(args: &InstallArgs) -> anyhow::Result<ConfigChange> {
    let Installed {
        conf_dir, entry, ..
    } = install_files(args)?;
    let change = conf_dir
        .install(&entry)
        .context("installing the ambit-cni plugin entry")?;
    log_change(&change);
    Ok(change)
}

/// Installs, then keeps the entry in place until SIGTERM or SIGINT; the first pass happens in
/// the watch, which waits for a primary network that is not there yet.
async fn install_and_watch(args: InstallArgs) -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let installed = tokio::task::spawn_blocking(move || install_files(&args))
        .await
        .context("installing the ambit-cni files")??;
    let (trigger, watcher) = drain::channel();
    let watch = tokio::spawn(installed.conf_dir.watch(
        installed.entry,
        installed.bin_dir,
        installed.kubeconfig,
        WATCH_INTERVAL,
        watcher,
    ));
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    // The entry stays: pods keep being set up while the installer restarts. `ambit cni
    // uninstall` takes it out.
    trigger.drain().await;
    watch.await.context("watching the CNI configuration")
}

/// The entry first, so that the runtime stops calling the plugin before its files go; all of
/// it with the directory locked, so that a running `--watch` sees it all gone, and stops.
fn uninstall(dirs: &Dirs) -> anyhow::Result<()> {
    let conf_dir = CniConfDir::new(&dirs.conf_dir);
    let _lock = conf_dir
        .lock()
        .context("locking the CNI configuration directory")?;
    for path in conf_dir
        .uninstall()
        .context("removing the ambit-cni plugin entry")?
    {
        tracing::info!(file = %path.display(), "ambit-cni plugin removed from the chain");
    }
    if conf_dir
        .remove_kubeconfig()
        .context("removing the ambit-cni kubeconfig")?
    {
        tracing::info!(file = %conf_dir.kubeconfig_path().display(), "ambit-cni kubeconfig removed");
    }
    let bin_dir = CniBinDir::new(&dirs.bin_dir);
    if bin_dir
        .remove_plugin()
        .context("removing the ambit-cni binary")?
    {
        tracing::info!(file = %bin_dir.plugin_path().display(), "ambit-cni binary removed");
    }
    Ok(())
}
