//! The `ambit` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Agent,
    /// Inspect the local agent: workloads, services, policies, certificates, connections.
    Debug,
    /// Build a small mesh of network namespaces on this machine and show it at work.
    Demo,
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
            Command::Agent | Command::Debug | Command::Demo => {
                tracing::error!(
                    "`ambit {}` is not available in this build yet",
                    self.command.name()
                );
                ExitCode::from(2)
            }
        }
    }
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Debug => "debug",
            Self::Demo => "demo",
            Self::Version => "version",
        }
    }
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
