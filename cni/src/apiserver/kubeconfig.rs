//! The part of a kubeconfig the plugin uses: the current context's server, CA and token.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

/// Why the kubeconfig cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KubeconfigError {
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} is not a kubeconfig", .0.display())]
    Decode(PathBuf, #[source] serde_yaml_ng::Error),
    #[error("the kubeconfig has no current-context and not exactly one context")]
    NoContext,
    #[error("the kubeconfig names {kind} {name:?}, which it does not define")]
    Undefined { kind: &'static str, name: String },
    #[error("the kubeconfig's cluster sets insecure-skip-tls-verify, which ambit-cni refuses")]
    InsecureRefused,
    #[error("the kubeconfig's cluster has no certificate-authority(-data)")]
    NoCertificateAuthority,
    #[error("the kubeconfig's certificate-authority-data is not base64")]
    CertificateAuthorityData(#[source] base64::DecodeError),
    #[error("the kubeconfig's user has no token or tokenFile")]
    NoToken,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct RawKubeconfig {
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize, Debug)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority_data: Option<String>,
    certificate_authority: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize, Debug)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize, Debug)]
struct Context {
    cluster: String,
    user: String,
}

#[derive(Deserialize, Debug)]
struct NamedUser {
    name: String,
    user: User,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct User {
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// Where and how to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The `server` URL as written, e.g. `https://10.96.0.1:443`.
    pub(crate) server: String,
    /// The PEM certificates that the server's chain must lead to.
    pub(crate) certificate_authority_pem: Vec<u8>,
    pub(crate) token: String,
}

impl Credentials {
    pub(crate) fn load(path: &Path) -> Result<Self, KubeconfigError> {
        let text = fs::read(path).map_err(|e| KubeconfigError::Read(path.to_owned(), e))?;
        let raw: RawKubeconfig = serde_yaml_ng::from_slice(&text)
            .map_err(|e| KubeconfigError::Decode(path.to_owned(), e))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawKubeconfig) -> Result<Self, KubeconfigError> {
        let context = match (&raw.current_context, raw.contexts.as_slice()) {
            (Some(name), contexts) => &find(contexts, "context", name, |c| &c.name)?.context,
            (None, [only]) => &only.context,
            (None, _) => return Err(KubeconfigError::NoContext),
        };
        let cluster = &find(&raw.clusters, "cluster", &context.cluster, |c| &c.name)?.cluster;
        let user = &find(&raw.users, "user", &context.user, |u| &u.name)?.user;
        if cluster.insecure_skip_tls_verify {
            return Err(KubeconfigError::InsecureRefused);
        }
        let certificate_authority_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => STANDARD
                .decode(data.trim())
                .map_err(KubeconfigError::CertificateAuthorityData)?,
            (None, Some(path)) => {
                fs::read(path).map_err(|e| KubeconfigError::Read(path.clone(), e))?
            }
            (None, None) => return Err(KubeconfigError::NoCertificateAuthority),
        };
        let token = match (&user.token, &user.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => fs::read_to_string(path)
                .map_err(|e| KubeconfigError::Read(path.clone(), e))?
                .trim()
                .to_owned(),
            (None, None) => return Err(KubeconfigError::NoToken),
        };
        if token.is_empty() {
            return Err(KubeconfigError::NoToken);
        }
        Ok(Self {
            server: cluster.server.clone(),
            certificate_authority_pem,
            token,
        })
    }
}

fn find<'a, T>(
    items: &'a [T],
    kind: &'static str,
    name: &str,
    name_of: impl Fn(&T) -> &String,
) -> Result<&'a T, KubeconfigError> {
    items
        .iter()
        .find(|item| name_of(item) == name)
        .ok_or_else(|| KubeconfigError::Undefined {
            kind,
            name: name.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Credentials, KubeconfigError> {
        Credentials::from_raw(serde_yaml_ng::from_str(text).unwrap())
    }

    const ISTIO_CNI_STYLE: &str = "
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://10.96.0.1:443
    certificate-authority-data: LS0tLS1CRUdJTg==
users:
- name: ambit-cni
  user:
    token: eyJhbGciOi
contexts:
- name: ambit-cni-context
  context: {cluster: local, user: ambit-cni}
current-context: ambit-cni-context
";

    #[test]
    fn reads_the_current_context() {
        let credentials = parse(ISTIO_CNI_STYLE).unwrap();
        assert_eq!(credentials.server, "https://10.96.0.1:443");
        assert_eq!(credentials.certificate_authority_pem, b"-----BEGIN");
        assert_eq!(credentials.token, "eyJhbGciOi");
    }

    #[test]
    fn refuses_to_skip_verification() {
        let insecure = ISTIO_CNI_STYLE.replace(
            "certificate-authority-data: LS0tLS1CRUdJTg==",
            "insecure-skip-tls-verify: true",
        );
        assert!(matches!(
            parse(&insecure),
            Err(KubeconfigError::InsecureRefused)
        ));
    }

    #[test]
    fn refuses_missing_pieces() {
        let no_token = ISTIO_CNI_STYLE.replace("token: eyJhbGciOi", "username: x");
        assert!(matches!(parse(&no_token), Err(KubeconfigError::NoToken)));
        let no_ca = ISTIO_CNI_STYLE.replace("certificate-authority-data: LS0tLS1CRUdJTg==", "");
        assert!(matches!(
            parse(&no_ca),
            Err(KubeconfigError::NoCertificateAuthority)
        ));
        let dangling = ISTIO_CNI_STYLE.replace(
            "current-context: ambit-cni-context",
            "current-context: other",
        );
        assert!(matches!(
            parse(&dangling),
            Err(KubeconfigError::Undefined {
                kind: "context",
                ..
            })
        ));
    }
}
