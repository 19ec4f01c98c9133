//! The file side of the installer: which configuration the runtime loads, and writes that
//! readers never see half done.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::CniInstallError;
use super::conflist::{FileKind, NetworkConfig};

/// How our temporary files start; their `.tmp` extension keeps the runtime from loading them.
const TEMP_PREFIX: &str = ".ambit-cni-";
const TEMP_SUFFIX: &str = ".tmp";

/// A configuration file and its text.
#[derive(Debug)]
pub(super) struct ConfigFile {
    pub(super) path: PathBuf,
    pub(super) kind: FileKind,
    pub(super) text: String,
}

impl ConfigFile {
    pub(super) fn parse(&self) -> Result<NetworkConfig<'_>, CniInstallError> {
        NetworkConfig::parse(&self.text, self.kind).map_err(|source| CniInstallError::ParseConfig {
            path: self.path.clone(),
            source,
        })
    }
}

/// The files of `dir` the runtime considers, in the order it considers them: names sorted
/// byte by byte, extension `.conflist`, `.conf` or `.json`.
pub(super) fn config_paths(dir: &Path) -> Result<Vec<(PathBuf, FileKind)>, CniInstallError> {
    let read_dir = |source| CniInstallError::ReadConfDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let ours = path
            .file_name()
            .is_some_and(|name| name.as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()));
        if let Some(kind) = FileKind::of(&path).filter(|_| !ours && path.is_file()) {
            files.push((path, kind));
        }
    }
    files.sort_by(|(left, _), (right, _)| left.cmp(right));
    Ok(files)
}

/// The configuration the runtime runs for every pod: the first file that loads as a network.
/// Files that do not load are skipped, as the runtime skips them.
pub(super) fn primary(dir: &Path) -> Result<ConfigFile, CniInstallError> {
    for (path, kind) in config_paths(dir)? {
        let Some(file) = read_config(path, kind) else {
            continue;
        };
        match file.parse() {
            Ok(config) if config.is_network() => return Ok(file),
            Ok(_) => tracing::debug!(file = %file.path.display(), "skipped: only ambit's plugin"),
            Err(error) => {
                tracing::debug!(file = %file.path.display(), %error, "skipped: not a network");
            }
        }
    }
    Err(CniInstallError::NoNetwork {
        dir: dir.to_owned(),
    })
}

/// The file's text; `None`, logged, when it cannot be read (gone since the listing, or not
/// UTF-8), as the runtime would skip it too.
pub(super) fn read_config(path: PathBuf, kind: FileKind) -> Option<ConfigFile> {
    match fs::read_to_string(&path) {
        Ok(text) => Some(ConfigFile { path, kind, text }),
        Err(error) => {
            tracing::debug!(file = %path.display(), %error, "skipped: unreadable");
            None
        }
    }
}

/// The permission bits of `path`.
pub(super) fn mode(path: &Path) -> Result<u32, CniInstallError> {
    fs::metadata(path)
        .map(|metadata| metadata.permissions().mode() & 0o7777)
        .map_err(|source| CniInstallError::ReadFile {
            path: path.to_owned(),
            source,
        })
}

/// Writes `contents` to `path` with `mode` unless it holds exactly that already; tells whether
/// it wrote.
pub(super) fn write_if_changed(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<bool, CniInstallError> {
    let same = fs::read(path).is_ok_and(|current| current == contents)
        && self::mode(path).is_ok_and(|current| current == mode);
    if same {
        return Ok(false);
    }
    write_atomically(path, contents, mode)?;
    Ok(true)
}

/// Replaces `path` with `contents` in one step: a temporary file in the same directory, synced,
/// then renamed over it, so a reader sees the old file or the new one, never a part.
pub(super) fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), CniInstallError> {
    let write = |source| CniInstallError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| write(io::Error::other("no parent directory")))?;
    let mut temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(write)?;
    temp.write_all(contents).map_err(write)?;
    temp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(write)?;
    temp.as_file().sync_all().map_err(write)?;
    temp.persist(path).map_err(|error| write(error.error))?;
    Ok(())
}

/// Removes `path`; tells whether it was there.
pub(super) fn remove(path: &Path) -> Result<bool, CniInstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CniInstallError::RemoveFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// An exclusive `flock` on a directory, released when dropped.
#[derive(Debug)]
pub(super) struct DirLock(#[expect(dead_code, reason = "held for its drop")] Flock<File>);

/// Waits for an exclusive lock on `dir` itself: no lock file is left behind.
pub(super) fn lock_dir(dir: &Path) -> Result<DirLock, CniInstallError> {
    let file = File::open(dir).map_err(|source| CniInstallError::ReadConfDir {
        dir: dir.to_owned(),
        source,
    })?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map(DirLock)
        .map_err(|(_, source)| CniInstallError::LockDir {
            dir: dir.to_owned(),
            source,
        })
}
