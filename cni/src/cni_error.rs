//! The error result of the CNI specification, printed on stdout when a command fails.

use std::error::Error;
use std::fmt::Write as _;

use serde::Serialize;

use crate::agent::AgentError;
use crate::environment::EnvironmentError;
use crate::netconf::NetconfError;

/// The error codes this plugin answers with: the specification's well-known ones (1–99) and
/// its own (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not supported.
    IncompatibleVersion = 1,
    /// 4: a required `CNI_*` variable is missing or malformed.
    InvalidEnvironment = 4,
    /// 5: stdin could not be read.
    Io = 5,
    /// 6: the configuration is not JSON of the expected shape.
    Decode = 6,
    /// 7: the configuration is well-formed but unusable (no `prevResult`, bad addresses, ...).
    InvalidNetworkConfig = 7,
    /// 11: the agent is not reachable or did not answer in time; the runtime should retry.
    TryAgainLater = 11,
    /// 100: the agent answered that it could not do what was asked.
    AgentFailed = 100,
    /// 101: the agent's answer was not one that fits the request.
    UnexpectedReply = 101,
}

/// A failed command as the runtime receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniError {
    pub(crate) code: ErrorCode,
    pub(crate) msg: String,
    pub(crate) details: String,
}

impl CniError {
    pub(crate) fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error with its causes as the details.
    fn from_error(code: ErrorCode, error: &dyn Error) -> Self {
        Self::new(code, error.to_string(), causes(error))
    }

    /// The JSON document for stdout.
    pub(crate) fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Document<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let document = Document {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&document).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":{cni_version:?},\"code\":{},\"msg\":\"cannot encode the error\"}}",
                self.code as u32
            )
        })
    }
}

impl From<EnvironmentError> for CniError {
    fn from(error: EnvironmentError) -> Self {
        Self::from_error(ErrorCode::InvalidEnvironment, &error)
    }
}

impl From<NetconfError> for CniError {
    fn from(error: NetconfError) -> Self {
        let code = match error {
            NetconfError::Decode(_) => ErrorCode::Decode,
            NetconfError::UnsupportedVersion(_) => ErrorCode::IncompatibleVersion,
            NetconfError::ZeroTimeout | NetconfError::BadAddress { .. } | NetconfError::BadIps => {
                ErrorCode::InvalidNetworkConfig
            }
        };
        Self::from_error(code, &error)
    }
}

impl From<AgentError> for CniError {
    fn from(error: AgentError) -> Self {
        Self::from_error(ErrorCode::TryAgainLater, &error)
    }
}

/// `error`'s sources, outermost first, joined with ": "; empty when it has none.
pub(crate) fn causes(error: &dyn Error) -> String {
    let mut text = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        let _ = write!(text, "{cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_the_specified_shape() {
        let error = CniError::new(ErrorCode::TryAgainLater, "agent down", "connection refused");
        let value: serde_json::Value = serde_json::from_str(&error.to_json("1.0.0")).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "code": 11,
                "msg": "agent down",
                "details": "connection refused",
            })
        );
        let bare = CniError::new(ErrorCode::InvalidEnvironment, "CNI_NETNS is not set", "");
        assert_eq!(
            bare.to_json("0.4.0"),
            r#"{"cniVersion":"0.4.0","code":4,"msg":"CNI_NETNS is not set"}"#
        );
    }

    #[test]
    fn netconf_errors_map_to_the_specified_codes() {
        let decode = crate::netconf::Netconf::parse(b"[").unwrap_err();
        assert_eq!(CniError::from(decode).code, ErrorCode::Decode);
        let version = crate::netconf::Netconf::parse(br#"{"cniVersion":"9"}"#).unwrap_err();
        assert_eq!(CniError::from(version).code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn details_hold_the_causes() {
        let error = AgentError::Unreachable {
            socket: "/run/a.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let cni = CniError::from(error);
        assert_eq!(cni.code, ErrorCode::TryAgainLater);
        assert_eq!(cni.msg, "cannot connect to the agent at /run/a.sock");
        assert_eq!(cni.details, "entity not found");
    }
}
