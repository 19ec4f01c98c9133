//! Finding a Kubernetes pod's network namespace through its processes: the namespace of the
//! processes kubelet placed in the pod's cgroup, confirmed by the pod's addresses.
//!
//! An address proves nothing on its own: any pod can add another pod's IP to its interface.
//! Only kubelet (and the runtime it drives) puts processes in a pod's cgroup.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::pod_cgroup::{MAX_UID_LEN, PodUid};
use super::{Netns, NetnsError, NetnsId, is_local};

/// Why a pod's network namespace was not found. Only [`NoProcess`](Self::NoProcess) is
/// expected in normal operation; every other refusal means something is wrong with the pod or
/// the node.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("invalid pod uid {0:?}: expected up to {MAX_UID_LEN} hexadecimal digits and dashes")]
    InvalidUid(String),
    #[error("the pod has no address to confirm its network namespace with")]
    NoAddress,
    /// No process of the pod runs (yet): its sandbox has not started, or it has ended.
    #[error("no process of the pod is running")]
    NoProcess,
    #[error(
        "the pod's processes are in {} network namespaces ({}): refusing to choose one",
        .namespaces.len(),
        Listed(.namespaces)
    )]
    Ambiguous { namespaces: Vec<NetnsId> },
    /// The pod runs in the agent's own namespace: a host-network pod, never captured.
    #[error("the pod's processes are in the agent's own network namespace {0}")]
    HostNamespace(NetnsId),
    #[error("the pod's address {ip} is not in the network namespace {netns} of its processes")]
    AddressMismatch { netns: NetnsId, ip: IpAddr },
    #[error("failed to list the processes in {}", .path.display())]
    ListProcesses {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read {}", .path.display())]
    ReadCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to open the network namespace of a process of the pod")]
    OpenNetns(#[source] NetnsError),
    #[error("failed to open the agent's own network namespace")]
    OpenOwnNetns(#[source] NetnsError),
    #[error("failed to check the pod's addresses in the network namespace of its processes")]
    CheckAddresses(#[source] NetnsError),
}

/// The `/proc` of the node's PID namespace, where kubelet's pods run: `/proc` for an agent on
/// the host's PID namespace, or wherever the node's `/proc` is mounted for one that is not.
#[derive(Debug, Clone)]
pub struct HostProc(PathBuf);

impl HostProc {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The network namespace of the pod `pod_uid`: the one namespace its processes share,
    /// provided it holds every one of `pod_ips` and is not the agent's own.
    ///
    /// Blocking: reads the cgroup file of every process, then enters the namespace to look at
    /// its addresses. Call it through `spawn_blocking`; for many pods at once, [`scan`](Self::scan)
    /// once.
    pub fn find_pod_netns(
        &self,
        pod_uid: &str,
        pod_ips: &[IpAddr],
    ) -> Result<Netns, PodNetnsError> {
        let uid = checked(pod_uid, pod_ips)?;
        self.scan()?.find(&uid, pod_ips)
    }

    /// The network namespaces of every pod's processes, from one pass over the processes.
    /// Blocking, as [`find_pod_netns`](Self::find_pod_netns).
    pub fn scan(&self) -> Result<PodProcesses, PodNetnsError> {
        let list_error = |source| PodNetnsError::ListProcesses {
            path: self.0.clone(),
            source,
        };
        let own = Netns::current().map_err(PodNetnsError::OpenOwnNetns)?.id();
        let mut namespaces: HashMap<PodUid, Vec<Netns>> = HashMap::new();
        // One buffer for every cgroup file: they are a few hundred bytes each.
        let mut cgroup = Vec::new();
        for entry in fs::read_dir(&self.0).map_err(list_error)? {
            let process = entry.map_err(list_error)?;
            if !process
                .file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
            {
                continue;
            }
            // Both files are read through the process's directory, opened once: should its PID
            // be reused meanwhile, the directory still names the ended process, and answers
            // ESRCH rather than the files of another.
            let process = process.path();
            let directory = match File::open(&process) {
                Ok(directory) => directory,
                Err(error) if process_ended(&error) => continue,
                Err(source) => return Err(list_error(source)),
            };
            if !read_while_running(&directory, &process, "cgroup", &mut cgroup)? {
                continue;
            }
            let Some(pod) = PodUid::owning(&String::from_utf8_lossy(&cgroup)) else {
                continue;
            };
            let Some(netns) = open_while_running(&directory, &process, "ns/net")? else {
                continue;
            };
            let seen = namespaces.entry(pod).or_default();
            if seen.iter().all(|known| known.id != netns.id) {
                seen.push(netns);
            }
        }
        Ok(PodProcesses { own, namespaces })
    }
}

/// The network namespaces of the node's pods' processes, by pod, as one
/// [`scan`](HostProc::scan) found them.
#[derive(Debug)]
pub struct PodProcesses {
    /// The agent's own namespace.
    own: NetnsId,
    namespaces: HashMap<PodUid, Vec<Netns>>,
}

impl PodProcesses {
    /// As [`HostProc::find_pod_netns`], from this scan. Blocking: it enters the namespace found.
    pub fn find_pod_netns(
        &self,
        pod_uid: &str,
        pod_ips: &[IpAddr],
    ) -> Result<Netns, PodNetnsError> {
        self.find(&checked(pod_uid, pod_ips)?, pod_ips)
    }

    fn find(&self, uid: &PodUid, pod_ips: &[IpAddr]) -> Result<Netns, PodNetnsError> {
        let netns = match self.namespaces.get(uid).map(Vec::as_slice) {
            None | Some([]) => return Err(PodNetnsError::NoProcess),
            Some([netns]) => netns,
            Some(namespaces) => {
                return Err(PodNetnsError::Ambiguous {
                    namespaces: namespaces.iter().map(Netns::id).collect(),
                });
            }
        };
        if netns.id == self.own {
            return Err(PodNetnsError::HostNamespace(self.own));
        }
        match first_missing_address(netns, pod_ips).map_err(PodNetnsError::CheckAddresses)? {
            Some(ip) => Err(PodNetnsError::AddressMismatch {
                netns: netns.id,
                ip,
            }),
            None => netns.try_clone().map_err(PodNetnsError::OpenNetns),
        }
    }
}

/// The pod's UID, if it is one, provided the pod has an address to confirm its namespace with.
fn checked(pod_uid: &str, pod_ips: &[IpAddr]) -> Result<PodUid, PodNetnsError> {
    let uid =
        PodUid::parse(pod_uid).ok_or_else(|| PodNetnsError::InvalidUid(pod_uid.to_owned()))?;
    if pod_ips.is_empty() {
        return Err(PodNetnsError::NoAddress);
    }
    Ok(uid)
}

/// Opens `name` in a process's `directory`.
fn open_in(directory: &File, name: &str) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(directory, name, flags, Mode::empty()).map_err(io::Error::from)?;
    Ok(File::from(fd))
}

/// Reads the process's file `name` into `buffer`; `false` if the process has ended meanwhile.
/// Any other failure is an error: a process left unread could be one of the pod's in another
/// namespace.
fn read_while_running(
    directory: &File,
    process: &Path,
    name: &str,
    buffer: &mut Vec<u8>,
) -> Result<bool, PodNetnsError> {
    buffer.clear();
    match open_in(directory, name).and_then(|mut file| file.read_to_end(buffer)) {
        Ok(_) => Ok(true),
        Err(error) if process_ended(&error) => Ok(false),
        Err(source) => Err(PodNetnsError::ReadCgroup {
            path: process.join(name),
            source,
        }),
    }
}

/// Opens the process's namespace file `name`; `None` if the process has ended (or is a
/// zombie) meanwhile.
fn open_while_running(
    directory: &File,
    process: &Path,
    name: &str,
) -> Result<Option<Netns>, PodNetnsError> {
    let path = process.join(name);
    match open_in(directory, name) {
        Ok(file) => Netns::from_file(file, &path)
            .map(Some)
            .map_err(PodNetnsError::OpenNetns),
        Err(error) if process_ended(&error) => Ok(None),
        Err(error) => Err(PodNetnsError::OpenNetns(NetnsError::Open(path, error))),
    }
}

/// What reading `/proc/<pid>` answers once the process is gone.
fn process_ended(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(nix::libc::ESRCH)
}

/// The first of `ips` that no interface of `netns` has.
fn first_missing_address(netns: &Netns, ips: &[IpAddr]) -> Result<Option<IpAddr>, NetnsError> {
    netns.run_in(|| ips.iter().copied().find(|ip| !is_local(*ip)))
}

/// Namespace ids separated by commas.
struct Listed<'a>(&'a [NetnsId]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, id) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::{HostProc, NetnsId, PodNetnsError};

    const UID: &str = "0b5f3c2e-8a4d-4e7b-9c1a-2f6d8e0a1b3c";
    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));

    fn proc_with(processes: &[(&str, &str)]) -> tempfile::TempDir {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("cannot create a temporary directory");
        };
        for (pid, cgroup) in processes {
            let process = dir.path().join(pid);
            let created = std::fs::create_dir(&process)
                .and_then(|()| std::fs::write(process.join("cgroup"), cgroup));
            assert!(created.is_ok(), "{created:?}");
        }
        dir
    }

    #[test]
    fn a_hostile_uid_is_refused_before_looking() {
        let host = HostProc::new("/nonexistent");
        let found = host.find_pod_netns("../kubepods", &[IP]);
        assert!(matches!(found, Err(PodNetnsError::InvalidUid(uid)) if uid == "../kubepods"));
    }

    #[test]
    fn a_pod_without_address_cannot_be_confirmed() {
        let host = HostProc::new("/nonexistent");
        assert!(matches!(
            host.find_pod_netns(UID, &[]),
            Err(PodNetnsError::NoAddress)
        ));
    }

    #[test]
    fn processes_of_other_pods_and_ended_ones_are_passed_over() {
        let other = "0::/kubepods/besteffort/pod9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a/c1\n";
        let dir = proc_with(&[("1", "0::/init.scope\n"), ("7", other), ("self", "")]);
        // A process that ended between listing /proc and reading its files.
        assert!(std::fs::create_dir(dir.path().join("8")).is_ok());
        let found = HostProc::new(dir.path()).find_pod_netns(UID, &[IP]);
        assert!(matches!(found, Err(PodNetnsError::NoProcess)), "{found:?}");
    }

    #[test]
    fn a_missing_proc_is_an_error_naming_it() {
        let found = HostProc::new("/nonexistent/proc").find_pod_netns(UID, &[IP]);
        let Err(error) = found else {
            panic!("found a namespace in /nonexistent/proc");
        };
        assert_eq!(
            error.to_string(),
            "failed to list the processes in /nonexistent/proc"
        );
    }

    #[test]
    fn ambiguity_names_every_namespace() {
        let error = PodNetnsError::Ambiguous {
            namespaces: vec![NetnsId { dev: 4, ino: 1 }, NetnsId { dev: 4, ino: 2 }],
        };
        assert_eq!(
            error.to_string(),
            "the pod's processes are in 2 network namespaces (net:[1], net:[2]): \
             refusing to choose one"
        );
    }
}
