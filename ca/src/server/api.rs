//! Calls to the Kubernetes API server, bounded in time: a stuck API server must cost a caller
//! an `Unavailable` answer it can retry, not a request that hangs.

use std::time::Duration;

/// How long one call to the API server may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// A call to the API server that failed or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("the API server failed the call")]
    Failed(#[source] kube::Error),
    #[error("the API server did not answer within {API_TIMEOUT:?}")]
    Timeout,
}

impl ApiCallError {
    /// Whether the API server answered that the object does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Failed(kube::Error::Api(status)) if status.is_not_found())
    }

    /// Whether the API server answered that the object to create exists already.
    pub(crate) fn is_already_exists(&self) -> bool {
        matches!(self, Self::Failed(kube::Error::Api(status)) if status.is_already_exists())
    }
}

/// Awaits `call`, for [`API_TIMEOUT`] at most.
pub(crate) async fn bounded<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiCallError> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| ApiCallError::Timeout)?
        .map_err(ApiCallError::Failed)
}
