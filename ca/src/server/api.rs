//! Calls to the Kubernetes API server, bounded in time and in number: a stuck API server, or a
//! flood of callers with made-up tokens, must cost a caller an `Unavailable` answer it can
//! retry, not a request that hangs or a queue of reviews that starves the real ones.

use std::time::Duration;

use tokio::sync::Semaphore;

/// How long one call to the API server may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls to the API server in flight at once, over all requests; renewals are rare, so more
/// than this means a flood, whose excess is refused at once.
const MAX_API_CALLS: usize = 64;
static API_CALLS: Semaphore = Semaphore::const_new(MAX_API_CALLS);

/// A call to the API server that failed or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("the API server failed the call")]
    Failed(#[source] kube::Error),
    #[error("the API server did not answer within {API_TIMEOUT:?}")]
    Timeout,
    #[error("{MAX_API_CALLS} calls to the API server are in flight already")]
    Busy,
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

/// Awaits `call`, for [`API_TIMEOUT`] at most, if fewer than [`MAX_API_CALLS`] are in flight.
pub(crate) async fn bounded<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiCallError> {
    let _permit = API_CALLS.try_acquire().map_err(|_| ApiCallError::Busy)?;
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| ApiCallError::Timeout)?
        .map_err(ApiCallError::Failed)
}
