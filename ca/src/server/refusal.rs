//! Why a request got no certificate, in the three forms it is reported: the gRPC status the
//! caller sees, a bounded reason for the metric, and the message of the log line.

use std::error::Error;
use std::fmt;

use tonic::{Code, Status};

/// A refused request. Each stage's error says what it becomes (`From` impls next to each
/// error), so the codes are decided where the failures are understood.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: Code,
    /// A fixed snake_case word: the `reason` label of `ambit_ca_requests_total`.
    pub(crate) reason: &'static str,
    /// The error and its causes.
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: Code, reason: &'static str, error: &dyn Error) -> Self {
        Self {
            code,
            reason,
            message: WithCauses(error).to_string(),
        }
    }

    /// A request that did not finish within `deadline`.
    pub(crate) fn deadline(deadline: std::time::Duration) -> Self {
        Self {
            code: Code::Unavailable,
            reason: "deadline_exceeded",
            message: format!("the request did not finish within {deadline:?}"),
        }
    }

    /// What the caller is told: why it was refused, but not the CA's own failures, whose
    /// details (the API server's address and answers) are for the log only.
    pub(crate) fn status(&self) -> Status {
        match self.code {
            Code::Unavailable => Status::unavailable("the CA cannot decide now; try again"),
            Code::Internal => Status::internal("the CA failed to sign"),
            code => Status::new(code, self.message.clone()),
        }
    }
}

/// The `code` label of a gRPC code, as gRPC spells the codes this server answers with.
pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Unauthenticated => "Unauthenticated",
        Code::PermissionDenied => "PermissionDenied",
        Code::InvalidArgument => "InvalidArgument",
        Code::Unavailable => "Unavailable",
        _ => "Internal",
    }
}

/// Displays an error followed by its causes, `error: cause: cause`, so that the caller and the
/// log see why an API call failed.
pub(crate) struct WithCauses<'a>(pub(crate) &'a dyn Error);

impl fmt::Display for WithCauses<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to review the token")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_message_carries_the_causes() {
        let error = Outer(std::io::Error::other("connection refused"));
        let refusal = Refusal::new(Code::Unavailable, "token_review_failed", &error);
        assert_eq!(
            refusal.message,
            "failed to review the token: connection refused"
        );
        assert_eq!(refusal.status().code(), Code::Unavailable);
        assert_eq!(code_label(refusal.code), "Unavailable");
    }
}
