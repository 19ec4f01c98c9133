//! The `ambit` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::ca_command::CaArgs;
use crate::cni_install::CniArgs;
use crate::config::{AgentArgs, AgentConfig, LogFormat};
use crate::debug::DebugArgs;
use crate::logging;
use crate::waypoint::WaypointArgs;

/// ambit: an ambient-mesh L4 agent for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "ambit", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Serve Istio's certificate service to the node agents, from the cluster's CA.
    Ca(Box<CaArgs>),
    /// Install ambit's chained CNI plugin on this node, or remove it.
    Cni(CniArgs),
    /// Inspect the local agent: workloads, services, policies, certificates, connections.
    Debug(DebugArgs),
    /// Build a small mesh of network namespaces on this machine and show it at work.
    Demo,
    /// Run a waypoint: the hop in front of the Services and pods bound to it.
    Waypoint(Box<WaypointArgs>),
    /// Print the version and the cryptography provider.
    Version,
}

impl Cli {
    /// Runs the command and tells the process how it went.
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Version => {
                print_line(&format!(
                    "ambit {}\ncrypto provider: {} (TLS 1.3; {})",
                    env!("CARGO_PKG_VERSION"),
                    ambit_identity::CRYPTO_PROVIDER_NAME,
                    cipher_suites(),
                ));
                ExitCode::SUCCESS
            }
            Command::Agent(args) => run_agent(*args),
            Command::Demo => run_demo(),
            Command::Ca(args) => args.run(),
            Command::Cni(args) => args.run(),
            Command::Debug(args) => args.run(),
            Command::Waypoint(args) => args.run(),
        }
    }
}

fn run_agent(args: AgentArgs) -> ExitCode {
    // Writes out the queued log lines when the agent returns.
    let (logging, _flush) = logging::init(args.log_format);
    match AgentConfig::try_from(args) {
        Ok(config) => block_on(crate::app::run(config, logging)),
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::from(2)
        }
    }
}

fn run_demo() -> ExitCode {
    let (_, _flush) = logging::init(LogFormat::Text);
    block_on(async { crate::demo::run(&mut std::io::stdout().lock()).await })
}

/// How long the runtime waits for blocking work once the command is done.
const RUNTIME_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Threads for blocking work (in pods' namespaces: capture, netlink, finding namespaces), at
/// most, whatever the number of pods; work beyond waits its turn. Idle ones exit after 10 s.
const BLOCKING_THREADS: usize = 32;

/// Runs `task` on a multi-threaded runtime; an error is logged with its causes.
pub(crate) fn block_on(task: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "failed to start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    // Blocking work still running (a stuck namespace lookup) must not hold the exit past the
    // drain deadline.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    code
}

fn cipher_suites() -> String {
    ambit_identity::crypto_provider()
        .cipher_suites
        .iter()
        .map(|suite| format!("{:?}", suite.suite()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[expect(
    clippy::print_stdout,
    reason = "the command's output is for the terminal"
)]
fn print_line(text: &str) {
    println!("{text}");
}
