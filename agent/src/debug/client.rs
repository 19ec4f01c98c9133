//! A client of the admin API: one HTTP/1 request per connection, with a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::admin::views::ErrorView;

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(super) enum ClientError {
    #[error(
        "no ambit agent answers at {0} ({1}); is the agent running on this node? (--admin to ask another)"
    )]
    Connect(SocketAddr, std::io::Error),
    #[error("the agent at {0} did not answer within {TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error("the request to {0} failed: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("{0}")]
    Refused(String),
    #[error("the agent answered {0} with something unexpected: {1}")]
    Unexpected(StatusCode, String),
    #[error("failed to start: {0}")]
    Runtime(std::io::Error),
}

#[derive(Debug)]
pub(super) struct AdminClient {
    addr: SocketAddr,
}

impl AdminClient {
    pub(super) fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path).await
    }

    pub(super) async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::POST, path).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let (status, body) = tokio::time::timeout(TIMEOUT, self.exchange(method, path))
            .await
            .map_err(|_| ClientError::Timeout(self.addr))??;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Unexpected(status, e.to_string()));
        }
        match serde_json::from_slice::<ErrorView>(&body) {
            Ok(error) => Err(ClientError::Refused(error.error)),
            Err(_) => Err(ClientError::Unexpected(
                status,
                String::from_utf8_lossy(&body).trim().to_owned(),
            )),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http_error = |error| ClientError::Http(self.addr, error);
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|error| ClientError::Connect(self.addr, error))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(http_error)?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Unexpected(StatusCode::BAD_REQUEST, e.to_string()))?;
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http_error)?
            .to_bytes();
        Ok((status, body))
    }
}
