//! A root the CA created, kept in a Secret so that it outlives the CA's pod and is shared by
//! its replicas.
//!
//! At start the Secret is the truth and the CA directory (an emptyDir) a copy of it: the
//! Secret's four files are written into the directory, whatever it held. Without the Secret, a
//! root is created in the directory (or the one a previous start there left is taken) and a new
//! Secret stores it; when another replica created the Secret first, its root replaces ours
//! before anything is signed. Any failure stops the start: signing under a root that is not
//! kept would break every agent's trust at the next restart.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ambit_identity::{CA_KEY_FILE, LocalCa, LocalCaError, TrustDomain};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::api::{ApiCallError, bounded};
use super::authority::CA_FILES;
use super::namespaced_name::{NamespacedName, owned_metadata};

/// Why the root could not be restored from its Secret or kept in one.
#[derive(Debug, thiserror::Error)]
pub enum RootSecretError {
    #[error("failed to read Secret {secret}")]
    Read {
        secret: NamespacedName,
        #[source]
        source: ApiCallError,
    },
    #[error(
        "Secret {secret} lacks {missing:?}: it must hold all of {CA_FILES:?} (or be deleted, to have a new root created)"
    )]
    MissingKeys {
        secret: NamespacedName,
        missing: Vec<&'static str>,
    },
    #[error("Secret {secret} holds no usable CA")]
    Unusable {
        secret: NamespacedName,
        #[source]
        source: LocalCaError,
    },
    #[error("failed to write {}", .0.display())]
    WriteFile(PathBuf, #[source] io::Error),
    #[error("failed to create a root in {}", .0.display())]
    CreateRoot(PathBuf, #[source] LocalCaError),
    #[error("failed to read the created root's {}", .0.display())]
    ReadCreated(PathBuf, #[source] io::Error),
    #[error("failed to create Secret {secret} to keep the created root")]
    Create {
        secret: NamespacedName,
        #[source]
        source: ApiCallError,
    },
    #[error("Secret {secret} was created by another replica but was gone when read")]
    Vanished { secret: NamespacedName },
}

/// The contents of the four CA files, in the order of [`CA_FILES`].
type CaFileContents = [Vec<u8>; 4];

/// Fills `dir` with the root kept in `secret`, creating and keeping one first if there is none.
pub(crate) async fn restore_or_keep(
    client: kube::Client,
    secret: &NamespacedName,
    dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<(), RootSecretError> {
    let secrets = Api::<Secret>::namespaced(client, secret.namespace.as_str());
    if let Some(kept) = read(&secrets, secret).await? {
        restore(secret, &kept, dir)?;
        tracing::info!(%secret, dir = %dir.display(), "restored the root kept in the Secret");
        return Ok(());
    }
    LocalCa::load_or_create(dir, trust_domain)
        .map_err(|error| RootSecretError::CreateRoot(dir.to_owned(), error))?;
    let files = read_dir_files(dir)?;
    match bounded(secrets.create(&PostParams::default(), &kept_in(secret, files))).await {
        Ok(_) => {
            tracing::info!(%secret, "created a root and kept it in a new Secret");
            Ok(())
        }
        Err(error) if error.is_already_exists() => {
            let kept = read(&secrets, secret)
                .await?
                .ok_or_else(|| RootSecretError::Vanished {
                    secret: secret.clone(),
                })?;
            restore(secret, &kept, dir)?;
            tracing::info!(%secret, "another replica kept its root in the Secret first; using that one");
            Ok(())
        }
        Err(source) => Err(RootSecretError::Create {
            secret: secret.clone(),
            source,
        }),
    }
}

async fn read(
    secrets: &Api<Secret>,
    secret: &NamespacedName,
) -> Result<Option<Secret>, RootSecretError> {
    bounded(secrets.get_opt(secret.name.as_str()))
        .await
        .map_err(|source| RootSecretError::Read {
            secret: secret.clone(),
            source,
        })
}

/// Writes the files of `kept` into `dir` and checks that they load.
fn restore(secret: &NamespacedName, kept: &Secret, dir: &Path) -> Result<(), RootSecretError> {
    let files = files_of(secret, kept)?;
    for (file, contents) in CA_FILES.iter().zip(&files) {
        write_file(&dir.join(file), contents)
            .map_err(|error| RootSecretError::WriteFile(dir.join(file), error))?;
    }
    LocalCa::load(dir).map_err(|source| RootSecretError::Unusable {
        secret: secret.clone(),
        source,
    })?;
    Ok(())
}

/// The four files of a Secret, or which are missing.
fn files_of(secret: &NamespacedName, kept: &Secret) -> Result<CaFileContents, RootSecretError> {
    let data = kept.data.as_ref();
    let file = |name: &str| data.and_then(|data| data.get(name)).map(|bytes| &bytes.0);
    let missing: Vec<&'static str> = CA_FILES
        .into_iter()
        .filter(|name| file(name).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(RootSecretError::MissingKeys {
            secret: secret.clone(),
            missing,
        });
    }
    Ok(CA_FILES.map(|name| file(name).cloned().unwrap_or_default()))
}

fn read_dir_files(dir: &Path) -> Result<CaFileContents, RootSecretError> {
    let mut files = CaFileContents::default();
    for (name, contents) in CA_FILES.iter().zip(&mut files) {
        let path = dir.join(name);
        *contents = fs::read(&path).map_err(|error| RootSecretError::ReadCreated(path, error))?;
    }
    Ok(files)
}

/// The Secret that keeps `files`.
fn kept_in(secret: &NamespacedName, files: CaFileContents) -> Secret {
    let data: BTreeMap<String, ByteString> = CA_FILES
        .iter()
        .zip(files)
        .map(|(name, contents)| ((*name).to_owned(), ByteString(contents)))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(secret.name.to_string()),
            namespace: Some(secret.namespace.to_string()),
            ..owned_metadata()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Writes `contents` to `path` through a file beside it renamed over it, so that the file is
/// whole or absent; the key is readable by its owner only.
fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mode = if path.file_name().is_some_and(|name| name == CA_KEY_FILE) {
        0o600
    } else {
        0o644
    };
    let mut staged_name = path.file_name().unwrap_or_default().to_owned();
    staged_name.push(".tmp");
    let staged = path.with_file_name(staged_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&staged)?;
    // The mode of `open` applies to a new file only: a leftover keeps its own otherwise.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&staged, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn secret() -> NamespacedName {
        NamespacedName {
            namespace: "ambit-system".parse().unwrap(),
            name: "cacerts".parse().unwrap(),
        }
    }

    fn created_root() -> (tempfile::TempDir, CaFileContents) {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), &"cluster.local".parse().unwrap()).unwrap();
        let files = read_dir_files(dir.path()).unwrap();
        (dir, files)
    }

    #[test]
    fn a_kept_root_is_restored_with_a_private_key() {
        let (created, files) = created_root();
        let kept = kept_in(&secret(), files);
        assert_eq!(kept.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            kept.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "ambit-ca"
        );

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "a leftover").unwrap();
        fs::set_permissions(dir.path().join(CA_KEY_FILE), Permissions::from_mode(0o644)).unwrap();
        restore(&secret(), &kept, dir.path()).unwrap();
        for file in CA_FILES {
            assert_eq!(
                fs::read(dir.path().join(file)).unwrap(),
                fs::read(created.path().join(file)).unwrap(),
                "{file}"
            );
        }
        let key_mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), CA_FILES.len(), "no staged file left behind");
    }

    #[test]
    fn a_secret_missing_keys_or_holding_no_ca_is_refused() {
        let (_created, files) = created_root();
        let mut kept = kept_in(&secret(), files);
        let data = kept.data.as_mut().unwrap();
        data.remove(CA_KEY_FILE);
        data.remove("cert-chain.pem");
        let dir = tempfile::tempdir().unwrap();
        let error = restore(&secret(), &kept, dir.path()).unwrap_err();
        assert!(
            matches!(&error, RootSecretError::MissingKeys { missing, .. }
                if missing == &[CA_KEY_FILE, "cert-chain.pem"]),
            "{error}"
        );
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );

        let (_created, mut files) = created_root();
        let key = CA_FILES
            .iter()
            .position(|file| *file == CA_KEY_FILE)
            .unwrap();
        files[key] = b"not a key".to_vec();
        let error = restore(&secret(), &kept_in(&secret(), files), dir.path()).unwrap_err();
        assert!(matches!(error, RootSecretError::Unusable { .. }), "{error}");
    }
}
