//! Network namespaces held by file descriptor, found through a pod's processes ([`HostProc`])
//! or by the IP a pod has in them, and entered on a thread of their own.

mod host_proc;
mod pod_cgroup;

use std::fmt;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use nix::sched::CloneFlags;

pub use host_proc::{HostProc, PodNetnsError};

/// Where `ip netns` (and CNI plugins) keep named namespaces.
const NAMED_NETNS_DIR: &str = "/var/run/netns";

/// Why a namespace could not be found, opened or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to open the network namespace {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("failed to enter the network namespace {0}")]
    Enter(NetnsId, #[source] nix::Error),
    #[error("failed to start a thread for the network namespace {0}")]
    SpawnThread(NetnsId, #[source] io::Error),
    #[error("the thread of the network namespace {0} has stopped")]
    ThreadGone(NetnsId),
}

/// A namespace's identity: the device and inode of its nsfs file, the same from every path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    /// The inode of the namespace's nsfs file, as `ip netns identify` and `/proc/*/ns` show it.
    pub(crate) fn inode(self) -> u64 {
        self.ino
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// An open network namespace. Holding the descriptor keeps the namespace alive and names it
/// unambiguously, whatever happens to the path it was opened from.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|e| NetnsError::Open(path.to_owned(), e))?;
        Self::from_file(file, path)
    }

    /// The namespace of a namespace file opened already (from `path`, for errors).
    pub(crate) fn from_file(file: File, path: &Path) -> Result<Self, NetnsError> {
        let metadata = file
            .metadata()
            .map_err(|e| NetnsError::Open(path.to_owned(), e))?;
        Ok(Self {
            id: NetnsId {
                dev: metadata.dev(),
                ino: metadata.ino(),
            },
            fd: file.into(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Finds the namespace in which `ip` is a local address: first among the named namespaces
    /// (where CNI plugins and `ip netns` pin pod namespaces), then among those of every process.
    /// The agent's own namespace is never a match. Blocking: it enters each candidate on a
    /// short-lived thread.
    pub fn find_by_ip(ip: IpAddr) -> Result<Option<Self>, NetnsError> {
        let own = Self::current()?.id;
        let mut seen = vec![own];
        for paths in [named_paths(), process_paths()] {
            let mut candidates = Vec::new();
            for path in paths {
                // Namespaces come and go while we look: one that vanished is not a candidate.
                let Ok(netns) = Self::open(&path) else {
                    continue;
                };
                if !seen.contains(&netns.id) {
                    seen.push(netns.id);
                    candidates.push(netns);
                }
            }
            if let Some(found) = Self::holding(ip, candidates) {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The first of `candidates` in which `ip` is local. A candidate that cannot be entered is
    /// passed over: a file of `ip netns add` is not a namespace until its bind mount is in.
    fn holding(ip: IpAddr, candidates: Vec<Self>) -> Option<Self> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    candidates.into_iter().find(|netns| {
                        nix::sched::setns(netns.fd.as_fd(), CloneFlags::CLONE_NEWNET).is_ok()
                            && is_local(ip)
                    })
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

fn entries(dir: &str) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
}

fn named_paths() -> Vec<PathBuf> {
    entries(NAMED_NETNS_DIR).collect()
}

/// The namespaces of running processes: a fallback for runtimes that do not pin namespaces.
fn process_paths() -> Vec<PathBuf> {
    entries("/proc")
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|path| path.join("ns/net"))
        .collect()
}

/// Whether an interface of the calling thread's namespace has `ip`. (Binding to `ip` is no test:
/// in a namespace whose loopback is down, as while it is being set up, any address binds.)
fn is_local(ip: IpAddr) -> bool {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addresses
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            address
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .any(|local| local == ip)
}

type Job = Box<dyn FnOnce() + Send>;

/// A pod's namespace with a thread that lives in it: work that must happen inside the pod
/// (creating sockets, changing its rules) is sent there. Cloning shares the thread, which ends
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct PodNetns {
    id: NetnsId,
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    pub fn enter(netns: Netns) -> Result<Self, NetnsError> {
        let id = netns.id;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered, outcome) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name(format!("netns-{}", id.ino))
            .spawn(move || {
                let result = nix::sched::setns(netns.fd.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = result.is_ok();
                let _ = entered.send(result);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })
            .map_err(|e| NetnsError::SpawnThread(id, e))?;
        outcome
            .recv()
            .map_err(|_| NetnsError::ThreadGone(id))?
            .map_err(|e| NetnsError::Enter(id, e))?;
        Ok(Self { id, jobs })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Runs `f` inside the namespace and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (result, outcome) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = result.send(f());
            }))
            .map_err(|_| NetnsError::ThreadGone(self.id))?;
        outcome.await.map_err(|_| NetnsError::ThreadGone(self.id))
    }
}
