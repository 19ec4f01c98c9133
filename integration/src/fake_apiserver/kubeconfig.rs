//! The kubeconfig clients load: written atomically once the server listens, so that its
//! appearance means the server is ready.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;

const NAME: &str = "fake-apiserver";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("failed to serialize the kubeconfig")]
    Serialize(#[source] serde_yaml_ng::Error),
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot rename {} to {}", .0.display(), .1.display())]
    Rename(PathBuf, PathBuf, #[source] std::io::Error),
}

/// Writes a kubeconfig for `https://{address}` trusting `ca_pem` and presenting `token`.
pub(super) fn write(
    path: &Path,
    address: SocketAddr,
    ca_pem: &str,
    token: &str,
) -> Result<(), KubeconfigError> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": {
            "server": format!("https://{address}"),
            "certificate-authority-data": STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": NAME, "user": {"token": token}}],
        "contexts": [{"name": NAME, "context": {"cluster": NAME, "user": NAME}}],
        "current-context": NAME,
        "preferences": {},
    });
    let text = serde_yaml_ng::to_string(&config).map_err(KubeconfigError::Serialize)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    fs::write(&temporary, text).map_err(|e| KubeconfigError::Write(temporary.clone(), e))?;
    fs::rename(&temporary, path).map_err(|e| KubeconfigError::Rename(temporary, path.to_owned(), e))
}
