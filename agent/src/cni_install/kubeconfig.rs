//! The kubeconfig the plugin reads when the agent is down: a file copied as it is, or one
//! written from this pod's service account, as istio-cni writes its own.
//!
//! The service account's token is projected and rotated by the kubelet (about hourly), so the
//! kubeconfig is not written once: [`KubeconfigSource::contents`] reads the current files each
//! time, and the caller writes only when the result differs from what is on disk.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;

use super::CniInstallError;

/// Where the kubelet mounts a pod's service-account token and the cluster's CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The names in the kubeconfig written from a service account.
const CLUSTER_NAME: &str = "local";
const USER_NAME: &str = "ambit-cni";
const CONTEXT_NAME: &str = "ambit-cni";

/// Where the plugin's kubeconfig comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// A kubeconfig file, copied as it is.
    File(PathBuf),
    /// The service account mounted in `dir` (`token` and `ca.crt`), for the API server at
    /// `server`.
    ServiceAccount { server: ApiServerUrl, dir: PathBuf },
}

impl KubeconfigSource {
    /// The service account of the pod this runs in, mounted where the kubelet puts it.
    pub fn in_cluster(server: ApiServerUrl) -> Self {
        Self::ServiceAccount {
            server,
            dir: PathBuf::from(SERVICE_ACCOUNT_DIR),
        }
    }

    /// The kubeconfig as it should be now.
    pub(super) fn contents(&self) -> Result<Vec<u8>, CniInstallError> {
        match self {
            Self::File(path) => read(path),
            Self::ServiceAccount { server, dir } => {
                let certificate_authority = read(&dir.join("ca.crt"))?;
                let token_path = dir.join("token");
                let token = String::from_utf8(read(&token_path)?).map_err(|_| {
                    CniInstallError::ServiceAccountToken {
                        path: token_path.clone(),
                        reason: "not UTF-8",
                    }
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(CniInstallError::ServiceAccountToken {
                        path: token_path,
                        reason: "empty",
                    });
                }
                render(server, &certificate_authority, token).map(String::into_bytes)
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CniInstallError> {
    std::fs::read(path).map_err(|source| CniInstallError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// The API server's `https://` URL, as a pod reaches it: from the `KUBERNETES_SERVICE_HOST` and
/// `KUBERNETES_SERVICE_PORT` the kubelet gives every container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerUrl(String);

impl ApiServerUrl {
    /// `host` is an IP address (an IPv6 one goes in brackets) or a DNS name; `port` a TCP port.
    pub fn new(host: &str, port: &str) -> Result<Self, CniInstallError> {
        let bad_host = || CniInstallError::ApiServerHost {
            host: host.to_owned(),
        };
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(address)) => format!("[{address}]"),
            Ok(IpAddr::V4(address)) => address.to_string(),
            Err(_) if is_dns_name(host) => host.to_owned(),
            // `[fd00::1]` as some platforms spell it.
            Err(_) => match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(inner) => format!("[{}]", inner.parse::<Ipv6Addr>().map_err(|_| bad_host())?),
                None => return Err(bad_host()),
            },
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| CniInstallError::ApiServerPort {
                port: port.to_owned(),
            })?;
        Ok(Self(format!("https://{host}:{port}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Letters, digits, `-` and `.`, in labels of 1 to 63 characters.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig<'a> {
    api_version: &'static str,
    kind: &'static str,
    clusters: [Named<Cluster<'a>>; 1],
    users: [Named<User<'a>>; 1],
    contexts: [Named<Context>; 1],
    current_context: &'static str,
}

#[derive(Serialize)]
struct Named<T> {
    name: &'static str,
    #[serde(flatten)]
    item: T,
}

#[derive(Serialize)]
struct Cluster<'a> {
    cluster: ClusterFields<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterFields<'a> {
    server: &'a str,
    certificate_authority_data: String,
}

#[derive(Serialize)]
struct User<'a> {
    user: UserFields<'a>,
}

#[derive(Serialize)]
struct UserFields<'a> {
    token: &'a str,
}

#[derive(Serialize)]
struct Context {
    context: ContextFields,
}

#[derive(Serialize)]
struct ContextFields {
    cluster: &'static str,
    user: &'static str,
}

/// A kubeconfig with one cluster, one user with a bearer token, and the context joining them.
/// Serialised, not formatted, so that no token or URL can change its structure.
fn render(
    server: &ApiServerUrl,
    certificate_authority: &[u8],
    token: &str,
) -> Result<String, CniInstallError> {
    let kubeconfig = Kubeconfig {
        api_version: "v1",
        kind: "Config",
        clusters: [Named {
            name: CLUSTER_NAME,
            item: Cluster {
                cluster: ClusterFields {
                    server: server.as_str(),
                    certificate_authority_data: STANDARD.encode(certificate_authority),
                },
            },
        }],
        users: [Named {
            name: USER_NAME,
            item: User {
                user: UserFields { token },
            },
        }],
        contexts: [Named {
            name: CONTEXT_NAME,
            item: Context {
                context: ContextFields {
                    cluster: CLUSTER_NAME,
                    user: USER_NAME,
                },
            },
        }],
        current_context: CONTEXT_NAME,
    };
    serde_yaml_ng::to_string(&kubeconfig).map_err(CniInstallError::EncodeKubeconfig)
}
