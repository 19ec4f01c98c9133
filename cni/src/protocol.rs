//! The plugin ↔ agent protocol: one JSON request line, one JSON reply line, then the agent
//! closes the connection.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin unless the network configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// The longest line either side accepts, newline included; a longer one is refused unread.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What the plugin asks the agent, once per CNI invocation for a Kubernetes pod.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// The CNI command being run.
    pub command: Command,
    /// `CNI_CONTAINERID`: the pod sandbox's id.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the pod's network namespace; empty on a DEL that had none.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the pod's interface that the primary plugin set up.
    pub interface: String,
    /// The pod, from `CNI_ARGS`.
    pub pod: PodRef,
    /// The pod's addresses as the primary plugin assigned them (`prevResult.ips`).
    pub ips: Vec<IpAddr>,
}

/// The CNI command a request is made for.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// Capture the pod if it belongs in the mesh; answer only once capture is in place.
    Add,
    /// Release whatever is held for the sandbox; idempotent.
    Del,
    /// Confirm that capture of an enrolled pod is still in place.
    Check,
}

/// A pod as the container runtime names it in `CNI_ARGS`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`; empty when the runtime did not pass it.
    pub uid: String,
}

/// The agent's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Reply {
    /// ADD: the pod is in the mesh and its traffic is captured.
    Captured,
    /// ADD: the pod is not in the mesh; nothing was done.
    NotInMesh,
    /// DEL: nothing is held for the sandbox any more.
    Released,
    /// CHECK: capture is as it should be (or the pod is not in the mesh).
    Checked,
    /// The agent could not do what was asked; `error` says why.
    Failed {
        /// What went wrong, for the runtime's events and logs.
        error: String,
    },
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the message is longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    #[error("the connection closed before a complete message")]
    Truncated,
    #[error("cannot read the message")]
    Read(#[source] std::io::Error),
    #[error("cannot write the message")]
    Write(#[source] std::io::Error),
    #[error("cannot decode the message")]
    Decode(#[source] serde_json::Error),
    #[error("cannot encode the message")]
    Encode(#[source] serde_json::Error),
}

/// A message of the protocol: one JSON object on one line of at most [`MAX_MESSAGE_BYTES`].
pub trait Message: Serialize + DeserializeOwned {
    /// The message as one line, newline included.
    fn to_line(&self) -> Result<String, ProtocolError> {
        let mut line = serde_json::to_string(self).map_err(ProtocolError::Encode)?;
        line.push('\n');
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::TooLong);
        }
        Ok(line)
    }

    /// Parses one line, with or without its newline.
    fn from_line(line: &str) -> Result<Self, ProtocolError> {
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::TooLong);
        }
        serde_json::from_str(line.trim_end_matches(['\n', '\r'])).map_err(ProtocolError::Decode)
    }

    /// Writes the message as one line and flushes.
    fn write_to(&self, writer: &mut impl Write) -> Result<(), ProtocolError> {
        writer
            .write_all(self.to_line()?.as_bytes())
            .and_then(|()| writer.flush())
            .map_err(ProtocolError::Write)
    }

    /// Reads one line of at most [`MAX_MESSAGE_BYTES`] and parses it.
    fn read_from(reader: &mut impl BufRead) -> Result<Self, ProtocolError> {
        Self::from_line(&read_line(reader)?)
    }
}

impl Message for Request {}
impl Message for Reply {}

/// Reads up to and including the first newline, refusing to buffer more than the limit.
fn read_line(reader: &mut impl BufRead) -> Result<String, ProtocolError> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(ProtocolError::Read(error)),
        };
        if available.is_empty() {
            return Err(ProtocolError::Truncated);
        }
        let (taken, complete) = match available.iter().position(|&byte| byte == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        if line.len() + taken > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::TooLong);
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if complete {
            return String::from_utf8(line).map_err(|error| {
                ProtocolError::Read(std::io::Error::new(std::io::ErrorKind::InvalidData, error))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Add,
            container_id: "c0ffee".to_owned(),
            netns: PathBuf::from("/var/run/netns/cni-1234"),
            interface: "eth0".to_owned(),
            pod: PodRef {
                namespace: "shop".to_owned(),
                name: "client".to_owned(),
                uid: "1111".to_owned(),
            },
            ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        }
    }

    #[test]
    fn request_wire_shape() {
        let line = request().to_line().unwrap();
        assert!(line.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "command": "ADD",
                "containerId": "c0ffee",
                "netns": "/var/run/netns/cni-1234",
                "interface": "eth0",
                "pod": {"namespace": "shop", "name": "client", "uid": "1111"},
                "ips": ["10.0.0.5", "fd00::5"],
            })
        );
    }

    #[test]
    fn reply_wire_shapes() {
        let failed = Reply::Failed {
            error: "no netns".to_owned(),
        };
        assert_eq!(
            failed.to_line().unwrap(),
            "{\"outcome\":\"failed\",\"error\":\"no netns\"}\n"
        );
        assert_eq!(
            Reply::NotInMesh.to_line().unwrap(),
            "{\"outcome\":\"notInMesh\"}\n"
        );
    }

    #[test]
    fn round_trips_through_a_stream() {
        let mut wire = Vec::new();
        request().write_to(&mut wire).unwrap();
        Reply::Captured.write_to(&mut wire).unwrap();
        let mut reader = BufReader::new(wire.as_slice());
        assert_eq!(Request::read_from(&mut reader).unwrap(), request());
        assert_eq!(Reply::read_from(&mut reader).unwrap(), Reply::Captured);
        for reply in [Reply::Released, Reply::Checked, Reply::NotInMesh] {
            assert_eq!(Reply::from_line(&reply.to_line().unwrap()).unwrap(), reply);
        }
    }

    #[test]
    fn refuses_an_oversized_line_without_a_newline() {
        let endless = vec![b'x'; MAX_MESSAGE_BYTES * 2];
        // A small buffer makes the reader go round the loop, as a socket would.
        let mut reader = BufReader::with_capacity(4096, endless.as_slice());
        assert!(matches!(
            Request::read_from(&mut reader),
            Err(ProtocolError::TooLong)
        ));
        assert!(matches!(
            Request::from_line(&"x".repeat(MAX_MESSAGE_BYTES + 1)),
            Err(ProtocolError::TooLong)
        ));
    }

    #[test]
    fn a_line_cut_short_is_truncated() {
        let mut reader = BufReader::new(&b"{\"outcome\":\"captured\"}"[..]);
        assert!(matches!(
            Reply::read_from(&mut reader),
            Err(ProtocolError::Truncated)
        ));
    }

    #[test]
    fn an_unknown_outcome_is_refused() {
        assert!(matches!(
            Reply::from_line("{\"outcome\":\"maybe\"}"),
            Err(ProtocolError::Decode(_))
        ));
    }
}
