//! Where workload certificates come from.

use std::future::Future;
use std::pin::Pin;

use crate::certificate::{CertificateError, WorkloadCertificate};
use crate::spiffe::Identity;

/// The future a [`CertificateProvider`] returns.
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, IssueError>> + Send + 'a>>;

/// A source of workload certificates: a CA in this process, a remote CA, or files that
/// something else maintains.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Obtains a new certificate, with a new key, for `identity`.
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a>;
}

/// Why no certificate could be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the certificate authority {authority} is unreachable")]
    Unreachable {
        authority: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the certificate authority {authority} refused the request")]
    Refused {
        authority: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the certificate authority {authority} answered with no usable chain: {reason}")]
    BadResponse { authority: String, reason: String },
    #[error("cannot read the credential that authenticates this node to the certificate authority")]
    Credential(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the certificate authority did not answer in time")]
    Timeout,
    #[error("failed to sign a certificate")]
    Sign(#[source] rcgen::Error),
    #[error("the issued certificate is unusable")]
    Unusable(#[source] CertificateError),
    #[error("asked for a certificate for {requested}, got one for {issued}")]
    IdentityMismatch {
        requested: Identity,
        issued: Identity,
    },
}
