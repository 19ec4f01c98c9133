//! The commands: ADD, DEL and CHECK ask the agent; VERSION, GC and STATUS answer alone.

use std::ffi::OsString;
use std::io::Read;

use crate::agent::{self, AgentError};
use crate::cni_error::{CniError, ErrorCode, causes};
use crate::environment::{CniCommand, Environment};
use crate::log::Log;
use crate::netconf::{Netconf, SUPPORTED_VERSIONS};
use crate::protocol::{Command, PodRef, Reply, Request};
use crate::unreachable;

/// The `cniVersion` of errors reported before the configuration could be read.
const FALLBACK_VERSION: &str = "1.0.0";

/// The largest network configuration read from stdin.
const MAX_NETCONF_BYTES: u64 = 1024 * 1024;

/// What the runtime receives from one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The result or error document; empty when the command has nothing to say.
    pub stdout: String,
    /// 0 on success, 1 when `stdout` holds an error.
    pub exit_code: u8,
}

/// Runs one invocation as the CNI specification defines it: `lookup` reads the `CNI_*`
/// environment variables, `stdin` holds the network configuration.
pub fn run(lookup: impl Fn(&str) -> Option<OsString>, stdin: impl Read) -> Outcome {
    let command = match CniCommand::from_env(&lookup) {
        Ok(command) => command,
        Err(error) => return failed(FALLBACK_VERSION, &CniError::from(error), &Log::stderr()),
    };
    if command == CniCommand::Version {
        return succeeded(Some(version_document()));
    }
    let netconf = match read_netconf(stdin) {
        Ok(netconf) => netconf,
        Err(error) => return failed(FALLBACK_VERSION, &error, &Log::stderr()),
    };
    let log = Log::open(netconf.log_file.as_deref());
    let result = Environment::from_env(&lookup)
        .map_err(CniError::from)
        .and_then(|environment| {
            let invocation = Invocation {
                netconf: &netconf,
                environment: &environment,
                log: &log,
            };
            match command {
                CniCommand::Add => invocation.add(),
                CniCommand::Del => invocation.del().map(|()| None),
                CniCommand::Check => invocation.check().map(|()| None),
                // The agent reconciles what it holds against the cluster by itself, and its
                // readiness is its own to report.
                CniCommand::Gc | CniCommand::Status => Ok(None),
                CniCommand::Version => Ok(Some(version_document())),
            }
        });
    match result {
        Ok(stdout) => succeeded(stdout),
        Err(error) => failed(&netconf.cni_version, &error, &log),
    }
}

fn read_netconf(stdin: impl Read) -> Result<Netconf, CniError> {
    let mut text = Vec::new();
    stdin
        .take(MAX_NETCONF_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|error| {
            CniError::new(
                ErrorCode::Io,
                "cannot read the network configuration from stdin",
                error.to_string(),
            )
        })?;
    if text.len() as u64 > MAX_NETCONF_BYTES {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("the network configuration is larger than {MAX_NETCONF_BYTES} bytes"),
            "",
        ));
    }
    Ok(Netconf::parse(&text)?)
}

fn version_document() -> String {
    serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn succeeded(stdout: Option<String>) -> Outcome {
    Outcome {
        stdout: stdout.unwrap_or_default(),
        exit_code: 0,
    }
}

fn failed(cni_version: &str, error: &CniError, log: &Log) -> Outcome {
    log.line(format_args!(
        "failed (code {}): {}: {}",
        error.code as u32, error.msg, error.details
    ));
    Outcome {
        stdout: error.to_json(cni_version),
        exit_code: 1,
    }
}

/// One ADD, DEL or CHECK with its inputs.
struct Invocation<'a> {
    netconf: &'a Netconf,
    environment: &'a Environment,
    log: &'a Log,
}

impl Invocation<'_> {
    /// Passes `prevResult` on once the agent has captured the pod or found it outside the mesh.
    fn add(&self) -> Result<Option<String>, CniError> {
        let result = self.netconf.result().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "no prevResult: ambit-cni must be chained after the plugin that sets up the pod's network",
                "",
            )
        })?;
        let Some(pod) = &self.environment.pod else {
            self.log(
                "ADD",
                format_args!("not a Kubernetes pod; prevResult passed on"),
            );
            return Ok(Some(result.to_string()));
        };
        let request = self.request(Command::Add, pod)?;
        let reply = match agent::ask(&self.netconf.agent_socket, &request, self.netconf.timeout) {
            Ok(reply) => reply,
            Err(error @ AgentError::Unreachable { .. }) => {
                unreachable::ensure_outside_mesh(self.netconf, pod, &error)?;
                self.log(
                    "ADD",
                    format_args!(
                        "pod {}/{}: {error}, but the API server shows the pod outside the mesh; prevResult passed on",
                        pod.namespace, pod.name
                    ),
                );
                return Ok(Some(result.to_string()));
            }
            Err(error) => return Err(error.into()),
        };
        match reply {
            Reply::Captured | Reply::NotInMesh => {
                self.log(
                    "ADD",
                    format_args!("pod {}/{}: {reply:?}", pod.namespace, pod.name),
                );
                Ok(Some(result.to_string()))
            }
            Reply::Failed { error } => Err(CniError::new(
                ErrorCode::AgentFailed,
                "the ambit agent could not capture the pod",
                error,
            )),
            Reply::Released | Reply::Checked => Err(unexpected(Command::Add, &reply)),
        }
    }

    /// Tells the agent the sandbox is gone; succeeds when the agent is down, which then
    /// reconciles on start, so that pod deletion never waits on it.
    fn del(&self) -> Result<(), CniError> {
        let Some(pod) = &self.environment.pod else {
            return Ok(());
        };
        let request = Request {
            command: Command::Del,
            container_id: self.environment.container_id()?.to_owned(),
            netns: self.environment.netns.clone().unwrap_or_default(),
            interface: self.environment.interface.clone().unwrap_or_default(),
            pod: pod.clone(),
            ips: self.netconf.pod_ips().unwrap_or_default(),
        };
        match agent::ask(&self.netconf.agent_socket, &request, self.netconf.timeout) {
            Ok(Reply::Released | Reply::NotInMesh) => Ok(()),
            Ok(Reply::Failed { error }) => Err(CniError::new(
                ErrorCode::AgentFailed,
                "the ambit agent could not release the pod",
                error,
            )),
            Ok(reply @ (Reply::Captured | Reply::Checked)) => Err(unexpected(Command::Del, &reply)),
            Err(error) => {
                self.log(
                    "DEL",
                    format_args!(
                        "pod {}/{}: {error}: {}; the agent reconciles when it is back",
                        pod.namespace,
                        pod.name,
                        causes(&error)
                    ),
                );
                Ok(())
            }
        }
    }

    /// Asks the agent whether capture is still in place.
    fn check(&self) -> Result<(), CniError> {
        let Some(pod) = &self.environment.pod else {
            return Ok(());
        };
        let request = self.request(Command::Check, pod)?;
        match agent::ask(&self.netconf.agent_socket, &request, self.netconf.timeout)? {
            Reply::Checked => Ok(()),
            Reply::Failed { error } => Err(CniError::new(
                ErrorCode::AgentFailed,
                "the pod's capture is not as it should be",
                error,
            )),
            reply @ (Reply::Captured | Reply::NotInMesh | Reply::Released) => {
                Err(unexpected(Command::Check, &reply))
            }
        }
    }

    fn request(&self, command: Command, pod: &PodRef) -> Result<Request, CniError> {
        Ok(Request {
            command,
            container_id: self.environment.container_id()?.to_owned(),
            netns: self.environment.netns()?.clone(),
            interface: self.environment.interface()?.to_owned(),
            pod: pod.clone(),
            ips: self.netconf.pod_ips()?,
        })
    }

    fn log(&self, command: &str, message: std::fmt::Arguments<'_>) {
        let container = self.environment.container_id.as_deref().unwrap_or("-");
        self.log
            .line(format_args!("{command} container={container}: {message}"));
    }
}

fn unexpected(command: Command, reply: &Reply) -> CniError {
    CniError::new(
        ErrorCode::UnexpectedReply,
        format!("the ambit agent answered {command:?} with {reply:?}"),
        "",
    )
}
