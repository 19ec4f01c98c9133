//! `ambit debug`: the node-level CLI. It reads the local agent's admin API and answers the
//! questions of whoever runs the node: what is enrolled and captured, which policies are in
//! force, which certificates are held, what is connected, and why a connection would be denied.

mod client;
mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use crate::admin::query;
use crate::admin::views::{CheckView, Edge, LoggingView};
use client::{AdminClient, ClientError};

#[derive(Debug, Args)]
pub struct DebugArgs {
    /// The admin API of the agent to ask.
    #[arg(
        long,
        global = true,
        env = "AMBIT_ADMIN",
        default_value = "127.0.0.1:15000"
    )]
    admin: String,
    /// Tables for people, JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: DebugCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// This agent (pid, version, capture backend), and the agent it replaced while that one
    /// drains.
    Agent,
    /// The workloads the agent knows, and whether this node's are captured.
    Workloads,
    /// The services the agent knows.
    Services,
    /// The AuthorizationPolicies and PeerAuthentications in force, and any rejected.
    Policies,
    /// The workload certificates the agent holds.
    Certs,
    /// The connections open now, with identities and bytes.
    Connections,
    /// Shows the log filter, or sets it (`debug`, `warn,access=info`, ...).
    LogLevel { filter: Option<String> },
    /// Would a connection be allowed, and by which policy?
    Check {
        /// A pod (`namespace/name` or `name`), a SPIFFE identity or an IP.
        #[arg(long)]
        from: String,
        /// `<pod|ip>:<port>`.
        #[arg(long)]
        to: String,
    },
    /// The latest names a pod of this node resolved through the DNS proxy, and the answers.
    Dns {
        /// The pod (`namespace/name`, `name` or its IP).
        #[arg(long)]
        pod: String,
    },
    /// The edges of the traffic baseline: who connected to which workload and port.
    Edges,
    /// AuthorizationPolicies (YAML) that allow exactly the observed edges.
    SuggestPolicy {
        /// Edges saved with `ambit debug edges -o json` (from several nodes, say), instead of
        /// the local agent's.
        #[arg(long = "edges")]
        edge_files: Vec<PathBuf>,
    },
}

/// Why a debug command failed; the message is one line.
#[derive(Debug, thiserror::Error)]
enum DebugError {
    #[error("--admin {0:?} is not an address such as 127.0.0.1:15000")]
    AdminAddr(String),
    #[error(transparent)]
    Check(#[from] crate::admin::check::CheckError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {message}")]
    EdgeFile { path: PathBuf, message: String },
}

impl DebugError {
    /// 2 for bad input, 1 for everything else.
    fn exit_code(&self) -> ExitCode {
        match self {
            Self::AdminAddr(_) | Self::Check(_) | Self::EdgeFile { .. } => ExitCode::from(2),
            Self::Client(_) => ExitCode::FAILURE,
        }
    }
}

impl DebugArgs {
    pub(crate) fn run(self) -> ExitCode {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let result = match runtime {
            Ok(runtime) => runtime.block_on(self.execute()),
            Err(error) => Err(DebugError::Client(ClientError::Runtime(error))),
        };
        match result {
            Ok(text) => {
                write_stdout(&text);
                ExitCode::SUCCESS
            }
            Err(error) => {
                write_stderr(&format!("error: {error}\n"));
                error.exit_code()
            }
        }
    }

    /// What to print.
    async fn execute(self) -> Result<String, DebugError> {
        let admin: SocketAddr = self
            .admin
            .parse()
            .map_err(|_| DebugError::AdminAddr(self.admin.clone()))?;
        let client = AdminClient::new(admin);
        let json = self.output == Output::Json;
        let text = match self.command {
            DebugCommand::Agent => show(&client, "/debug/agent", json, render::agent).await?,
            DebugCommand::Workloads => {
                show(&client, "/debug/workloads", json, render::workloads).await?
            }
            DebugCommand::Services => {
                show(&client, "/debug/services", json, render::services).await?
            }
            DebugCommand::Policies => {
                show(&client, "/debug/policies", json, render::policies).await?
            }
            DebugCommand::Certs => show(&client, "/debug/certs", json, render::certs).await?,
            DebugCommand::Connections => {
                show(&client, "/debug/connections", json, render::connections).await?
            }
            DebugCommand::Edges => show(&client, "/debug/edges", json, render::edges).await?,
            DebugCommand::Dns { pod } => {
                let path = format!("/debug/dns?{}", query::encode(&[("pod", &pod)]));
                show(&client, &path, json, render::dns).await?
            }
            DebugCommand::LogLevel { filter } => {
                let view: LoggingView = match filter {
                    None => client.get("/logging").await?,
                    Some(filter) => {
                        let path = format!("/logging?{}", query::encode(&[("level", &filter)]));
                        client.post(&path).await?
                    }
                };
                render::output(&view, json, |v: &LoggingView| format!("{}\n", v.level))
            }
            DebugCommand::Check { from, to } => {
                crate::admin::check::parse_target(&to)?;
                let path = format!(
                    "/debug/check?{}",
                    query::encode(&[("from", &from), ("to", &to)])
                );
                let view: CheckView = client.get(&path).await?;
                render::output(&view, json, render::check)
            }
            DebugCommand::SuggestPolicy { edge_files } => {
                let edges = if edge_files.is_empty() {
                    client.get("/debug/edges").await?
                } else {
                    read_edges(&edge_files)?
                };
                crate::telemetry::suggest_policies(&edges)
            }
        };
        Ok(text)
    }
}

/// Fetches a view and renders it.
async fn show<T: DeserializeOwned + serde::Serialize>(
    client: &AdminClient,
    path: &str,
    json: bool,
    table: fn(&T) -> String,
) -> Result<String, DebugError> {
    let view: T = client.get(path).await?;
    Ok(render::output(&view, json, table))
}

/// The edges of several files, merged.
fn read_edges(paths: &[PathBuf]) -> Result<Vec<Edge>, DebugError> {
    let mut edges = Vec::new();
    for path in paths {
        let file_error = |message: String| DebugError::EdgeFile {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let mut file: Vec<Edge> = serde_json::from_str(&text)
            .map_err(|e| file_error(format!("not the JSON of `ambit debug edges -o json`: {e}")))?;
        edges.append(&mut file);
    }
    Ok(edges)
}

#[expect(clippy::print_stdout, reason = "the command's output")]
fn write_stdout(text: &str) {
    print!("{text}");
}

#[expect(clippy::print_stderr, reason = "the command's error, one line")]
fn write_stderr(text: &str) {
    eprint!("{text}");
}
