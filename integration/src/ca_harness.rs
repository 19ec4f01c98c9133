//! `ambit ca` as a child process against `fake-apiserver`, another child process, for the
//! tests and the benchmark of the CA. Needs no root.
//!
//! - [`TestCa`] generates a CA in Istio's `cacerts` layout.
//! - [`ApiServerProcess`] serves a cluster and reviews tokens; its directory holds the files
//!   of a test.
//! - [`CaProcess`] is one `ambit ca` against it, with the flags a test adds: its client of the
//!   agent, its metrics, its log; several may run against one API server.
//! - [`CaHarness`] is the usual setup: both processes, with the CA written as the kubelet
//!   mounts a Secret, replaced at once as an update of the Secret does.

mod processes;
mod test_ca;

pub use processes::{ApiServerProcess, CaProcess};
pub use test_ca::TestCa;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// An API server, a CA directory laid out as a mounted Secret holding a CA, and `ambit ca`
/// signing with it.
#[derive(Debug)]
pub struct CaHarness {
    // Fields drop in order: the CA ends before the API server, whose directory holds the
    // CA directory.
    ca: CaProcess,
    ca_dir: SecretDir,
    api: ApiServerProcess,
}

impl CaHarness {
    /// Writes `ca` into the CA directory `cacerts` of `api`'s directory and starts `ambit ca`
    /// on it with `flags` besides the usual ones, logging to `ca.log`; returns once it
    /// listens.
    pub async fn start(api: ApiServerProcess, ca: &TestCa, flags: &[&str]) -> anyhow::Result<Self> {
        let mut ca_dir = SecretDir::create(api.path("cacerts"))?;
        ca_dir.write(ca.files())?;
        let ca = CaProcess::start(&api, "ca", &ca_dir.path, flags).await?;
        Ok(Self { ca, ca_dir, api })
    }

    /// The API server.
    pub fn api(&self) -> &ApiServerProcess {
        &self.api
    }

    /// `ambit ca`.
    pub fn ca(&self) -> &CaProcess {
        &self.ca
    }

    /// The CA directory, as `ambit ca` and the local CA read it.
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir.path
    }

    /// Replaces the files of the CA directory at once, as an update of the Secret does.
    pub fn replace_ca(&mut self, ca: &TestCa) -> anyhow::Result<()> {
        self.ca_dir.write(ca.files())
    }

    /// The process ids of `ambit ca` and of the API server.
    pub fn pids(&self) -> (u32, u32) {
        (self.ca.pid(), self.api.pid())
    }
}

/// A directory laid out as the kubelet mounts a Secret: each file a symlink through `..data`,
/// a symlink to the current version, swapped to change every file at once.
#[derive(Debug)]
struct SecretDir {
    path: PathBuf,
    versions: u32,
}

impl SecretDir {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, versions: 0 })
    }

    fn write(&mut self, files: &[(&'static str, String)]) -> anyhow::Result<()> {
        self.versions += 1;
        let version = format!("..version-{}", self.versions);
        fs::create_dir(self.path.join(&version))?;
        for (name, contents) in files {
            fs::write(self.path.join(&version).join(name), contents)?;
        }
        let staged = self.path.join("..data_tmp");
        symlink(&version, &staged)?;
        fs::rename(&staged, self.path.join("..data"))?;
        for (name, _) in files {
            let link = self.path.join(name);
            if link.symlink_metadata().is_err() {
                symlink(Path::new("..data").join(name), link)?;
            }
        }
        Ok(())
    }
}
