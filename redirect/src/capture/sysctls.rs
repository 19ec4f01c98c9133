//! Writing a pod's network sysctls. Procfs shows under `sys/net` the namespace of the thread
//! that opens a file, through whichever procfs mount it is opened, so the agent's pod thread
//! reaches the pod's sysctls through any `<proc>/sys/net`. That lets an agent whose own
//! `/proc/sys` is read-only (container runtimes mount it so in unprivileged containers) write
//! them through the host's `/proc/sys/net`, mounted writable elsewhere.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::statvfs::{FsFlags, statvfs};

use super::CaptureError;

/// A procfs `sys/net` directory, through which capture writes the sysctls of the pod whose
/// namespace the writing thread is in.
#[derive(Debug, Clone)]
pub struct NetSysctls(Arc<Path>);

impl NetSysctls {
    /// `dir` is the `sys/net` directory of a procfs mount: `/proc/sys/net`, or the host's
    /// mounted elsewhere.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into().into())
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Whether the directory is on a read-only mount, where every write would fail.
    pub(super) fn is_read_only(&self) -> nix::Result<bool> {
        Ok(statvfs(self.dir())?.flags().contains(FsFlags::ST_RDONLY))
    }

    /// Writes `value` to `name`, a path under the directory (`ipv4/conf/eth0/accept_local`).
    pub(super) fn write(&self, name: &str, value: &str) -> Result<(), CaptureError> {
        let path = self.0.join(name);
        std::fs::write(&path, value).map_err(|source| CaptureError::WriteSysctl { path, source })
    }
}

impl Default for NetSysctls {
    /// The agent's own `/proc/sys/net`.
    fn default() -> Self {
        Self::new("/proc/sys/net")
    }
}

/// What to check when a sysctl write failed: a read-only mount is a deployment mistake, not a
/// property of the pod.
pub(super) fn hint(error: &io::Error) -> &'static str {
    if error.raw_os_error() == Some(nix::libc::EROFS) {
        " (is /proc/sys/net mounted read-only? the agent writes pods' sysctls through \
         <--host-proc>/sys/net, which must be the host's, mounted writable)"
    } else {
        ""
    }
}
