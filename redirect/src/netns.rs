//! Network namespaces held by file descriptor, found through a pod's processes ([`HostProc`])
//! or by the IP a pod has in them, and entered by whichever thread has work in them, for that
//! work only: the agent keeps no thread per pod.

mod host_proc;
mod pod_cgroup;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sched::CloneFlags;

pub use host_proc::{HostProc, PodNetnsError, PodProcesses};

/// Where `ip netns` (and CNI plugins) keep named namespaces.
const NAMED_NETNS_DIR: &str = "/var/run/netns";

/// Why a namespace could not be found, opened or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to open the network namespace {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("failed to enter the network namespace {0}")]
    Enter(NetnsId, #[source] nix::Error),
    #[error("the agent is stopping: work in the network namespace {0} did not run")]
    Stopping(NetnsId),
    #[error("failed to duplicate the descriptor of the network namespace {0}")]
    Duplicate(NetnsId, #[source] io::Error),
}

/// A namespace's identity: the device and inode of its nsfs file, the same from every path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
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

    /// The namespace of a descriptor received from elsewhere (another agent, over a Unix
    /// socket).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetnsError> {
        Self::from_file(File::from(fd), Path::new("(a received descriptor)"))
    }

    /// The namespace a socket was created in.
    pub fn of_socket(socket: BorrowedFd<'_>) -> Result<Self, NetnsError> {
        let path = Path::new("(a socket's namespace)");
        // The ioctl's number may mean something else to a device: ask sockets only.
        let mode = nix::sys::stat::fstat(socket)
            .map_err(|e| NetnsError::Open(path.to_owned(), e.into()))?
            .st_mode;
        if mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
            return Err(NetnsError::Open(
                path.to_owned(),
                io::Error::new(io::ErrorKind::InvalidInput, "not a socket"),
            ));
        }
        // The kernel's SIOCGSKNS: a new descriptor of the socket's network namespace.
        const SIOCGSKNS: nix::libc::c_ulong = 0x894C;
        #[expect(unsafe_code, reason = "SIOCGSKNS has no safe wrapper")]
        // SAFETY: `socket` is an open socket for the duration of the borrow, and for a socket
        // SIOCGSKNS reads no argument (0 is passed) and returns a new descriptor or -1.
        let fd = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCGSKNS, 0) };
        if fd < 0 {
            return Err(NetnsError::Open(
                path.to_owned(),
                io::Error::last_os_error(),
            ));
        }
        #[expect(unsafe_code, reason = "a descriptor the kernel returned as an integer")]
        // SAFETY: the ioctl succeeded, so `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::from_file(File::from(fd), path)
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The namespaces of the node by the addresses local to them: the named namespaces first
    /// (where CNI plugins and `ip netns` pin pod namespaces), then those of every process; an
    /// address local to several is the first's. The agent's own namespace is left out, and so
    /// is one that cannot be entered: a file of `ip netns add` is not a namespace until its
    /// bind mount is in. Blocking: it enters each namespace once.
    pub fn by_address() -> Result<HashMap<IpAddr, Self>, NetnsError> {
        let mut seen = HashSet::from([Self::current()?.id]);
        let mut found = HashMap::new();
        for path in named_paths().into_iter().chain(process_paths()) {
            // Namespaces come and go while we look: one that vanished is not a candidate.
            let Ok(netns) = Self::open(&path) else {
                continue;
            };
            if !seen.insert(netns.id) {
                continue;
            }
            let Ok(addresses) = netns.run_in(local_addresses) else {
                continue;
            };
            for address in addresses {
                if let Entry::Vacant(entry) = found.entry(address)
                    && let Ok(netns) = netns.try_clone()
                {
                    entry.insert(netns);
                }
            }
        }
        Ok(found)
    }

    /// Another descriptor of the same namespace.
    pub fn try_clone(&self) -> Result<Self, NetnsError> {
        Ok(Self {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| NetnsError::Duplicate(self.id, e))?,
            id: self.id,
        })
    }

    /// Runs `f` on the calling thread inside this namespace, then takes the thread back to the
    /// namespace it was in, also when `f` panics. For work that must see the namespace (creating
    /// sockets, reading its interfaces and rules); sockets created inside stay in it.
    pub fn run_in<R>(&self, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        let home = ThreadNetns::take()?;
        if home.id == self.id {
            let result = f();
            ThreadNetns::put_back(home);
            return Ok(result);
        }
        if let Err(error) = nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            ThreadNetns::put_back(home);
            return Err(NetnsError::Enter(self.id, error));
        }
        let _home = GoHome(Some(home));
        Ok(f())
    }
}

thread_local! {
    /// The namespace the thread is in between two `run_in`, opened at its first: a connection
    /// made in a pod would otherwise cost three more system calls to find its way back. Only
    /// `run_in` moves a thread between namespaces, so this stays true; inside `f` it is empty
    /// and a nested `run_in` opens the thread's namespace again.
    static THREAD_NETNS: std::cell::RefCell<Option<Netns>> = const { std::cell::RefCell::new(None) };
}

/// The calling thread's namespace, as [`THREAD_NETNS`] keeps it.
struct ThreadNetns;

impl ThreadNetns {
    fn take() -> Result<Netns, NetnsError> {
        match THREAD_NETNS.with_borrow_mut(Option::take) {
            Some(netns) => Ok(netns),
            None => Netns::current(),
        }
    }

    fn put_back(netns: Netns) {
        THREAD_NETNS.set(Some(netns));
    }
}

/// Takes the thread back to its namespace when dropped.
struct GoHome(Option<Netns>);

impl Drop for GoHome {
    fn drop(&mut self) {
        let Some(home) = self.0.take() else {
            return;
        };
        if let Err(error) = nix::sched::setns(home.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread of the agent left in a pod's namespace would open the agent's sockets
            // there: stopping is the only safe way out. Capture stays and fails closed. Said on
            // stderr directly too: an abort does not wait for a log queue.
            let reason = format!(
                "failed to leave a pod's network namespace ({}): {error}; aborting",
                home.id
            );
            tracing::error!("{reason}");
            let _ = writeln!(io::stderr(), "{reason}");
            std::process::abort();
        }
        ThreadNetns::put_back(home);
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
    local_addresses().contains(&ip)
}

/// The addresses of the calling thread's namespace's interfaces; none when they cannot be read.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            address
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// A pod's namespace, where the agent creates its sockets for the pod and changes the pod's
/// capture. Work in it runs on the thread that asks ([`run_here`](Self::run_here)), or on the
/// runtime's blocking threads ([`run`](Self::run)), each entering the namespace for that work
/// only. Cloning shares the descriptor.
#[derive(Debug, Clone)]
pub struct PodNetns {
    netns: Arc<Netns>,
}

impl AsFd for PodNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.netns.as_fd()
    }
}

impl PodNetns {
    /// Checks that the namespace can be entered, and keeps it for work in it.
    pub fn enter(netns: Netns) -> Result<Self, NetnsError> {
        netns.run_in(|| ())?;
        Ok(Self {
            netns: Arc::new(netns),
        })
    }

    pub fn id(&self) -> NetnsId {
        self.netns.id
    }

    /// Runs `f`, which may block (commands, netlink, connecting), inside the namespace on a
    /// blocking thread of the runtime, and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let netns = self.netns.clone();
        match tokio::task::spawn_blocking(move || netns.run_in(f)).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(NetnsError::Stopping(self.netns.id)),
        }
    }

    /// Runs `f`, a few system calls that do not block (creating and binding a socket), inside
    /// the namespace on the calling thread: no hop to another thread on the way.
    pub fn run_here<R>(&self, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        self.netns.run_in(f)
    }
}
