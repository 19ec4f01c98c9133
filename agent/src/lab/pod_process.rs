//! Pods as kubelet leaves them on a node: a process in the pod's network namespace and in a
//! cgroup named after the pod's UID, so that the agent finds lab pods through their processes as
//! it does in a Kubernetes cluster.
//!
//! A topology's cgroups live under `<hierarchy>/<topology id>`, in the cgroup2 hierarchy, or
//! the v1 `pids` one where no cgroup2 hierarchy is writable. Dropping the topology removes them;
//! those of a process that died are swept away by the next topology.

use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::topology::Topology;

const MOUNTINFO: &str = "/proc/self/mountinfo";
/// How long a new process may take to enter its pod's namespace.
const ENTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a cgroup whose processes were killed may stay busy.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(5);

/// How kubelet names a pod's cgroups, after its cgroup driver. Lab pods are BestEffort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    /// cri-containerd-<container>.scope`, with the UID's dashes as underscores.
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<container>`.
    Cgroupfs,
}

impl CgroupLayout {
    /// The cgroups of a container of the pod `uid`, from the outermost down.
    fn container_cgroups(self, uid: &str, container: &str) -> [String; 4] {
        match self {
            Self::Systemd => [
                "kubepods.slice".to_owned(),
                "kubepods-besteffort.slice".to_owned(),
                format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
                format!("cri-containerd-{container}.scope"),
            ],
            Self::Cgroupfs => [
                "kubepods".to_owned(),
                "besteffort".to_owned(),
                format!("pod{uid}"),
                container.to_owned(),
            ],
        }
    }
}

/// Why a pod process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PodProcessError {
    #[error("failed to read the mounts in {MOUNTINFO}")]
    ReadMounts(#[source] io::Error),
    #[error("no cgroup2 or cgroup v1 pids hierarchy is mounted")]
    NoHierarchy,
    #[error("failed to create the cgroup {}", .path.display())]
    CreateCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to start a process in the network namespace {netns}")]
    Spawn {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("the process {pid} did not enter the network namespace {netns}")]
    EnterNetns { pid: u32, netns: String },
    #[error("failed to move the process {pid} into the cgroup {}", .path.display())]
    JoinCgroup {
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The cgroups of one topology, made on first use under `<hierarchy>/<topology id>`; dropping
/// it kills what still runs in them and removes them.
#[derive(Debug)]
pub(super) struct LabCgroups {
    id: String,
    root: Mutex<Option<PathBuf>>,
    /// Numbers the containers, which name their cgroups.
    containers: AtomicU32,
}

impl LabCgroups {
    pub(super) fn new(topology_id: &str) -> Self {
        Self {
            id: topology_id.to_owned(),
            root: Mutex::new(None),
            containers: AtomicU32::new(0),
        }
    }

    /// Starts `sleep infinity` in `netns`, then moves it into a new container cgroup of the
    /// pod `uid`: it is in the namespace before it is in the pod, as with a container runtime.
    pub(super) fn start(
        &self,
        uid: &str,
        netns: &str,
        layout: CgroupLayout,
    ) -> Result<PodProcess, PodProcessError> {
        let container = self.container_id(uid);
        let cgroups =
            CgroupDirs::create(&self.root()?, &layout.container_cgroups(uid, &container))?;
        let mut command = Topology::command_in(netns, "sleep");
        command
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|source| PodProcessError::Spawn {
            netns: netns.to_owned(),
            source,
        })?;
        // From here on, an error drops `process`, which kills it and removes its cgroups.
        let mut process = PodProcess { child, cgroups };
        process.wait_in_netns(netns)?;
        let procs = process.cgroup().join("cgroup.procs");
        std::fs::write(&procs, process.pid().to_string()).map_err(|source| {
            PodProcessError::JoinCgroup {
                pid: process.pid(),
                path: procs,
                source,
            }
        })?;
        Ok(process)
    }

    /// 64 hex digits, as a container ID, unique in this topology.
    fn container_id(&self, uid: &str) -> String {
        let number = self.containers.fetch_add(1, Ordering::Relaxed);
        let seed = format!("{}/{uid}/{number}", self.id);
        format!(
            "{:016x}{:016x}{:016x}{number:016x}",
            hash(&seed, 0),
            hash(&seed, 1),
            hash(&seed, 2)
        )
    }

    /// `<hierarchy>/<topology id>`, created in the first hierarchy that lets us.
    fn root(&self) -> Result<PathBuf, PodProcessError> {
        let mut root = self.root.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(root) = root.as_ref() {
            return Ok(root.clone());
        }
        let mut refused = None;
        for hierarchy in hierarchies()? {
            let path = hierarchy.join(&self.id);
            match create_cgroup(&path) {
                Ok(()) => return Ok(root.insert(path).clone()),
                Err(source) => refused = Some(PodProcessError::CreateCgroup { path, source }),
            }
        }
        Err(refused.unwrap_or(PodProcessError::NoHierarchy))
    }
}

impl Drop for LabCgroups {
    fn drop(&mut self) {
        let root = self.root.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(root) = root.take() {
            remove_tree(&root);
        }
    }
}

/// A process of a pod, in the pod's network namespace and in a container cgroup of the pod.
/// Dropping it kills it and removes the cgroups it leaves empty.
#[derive(Debug)]
pub struct PodProcess {
    child: Child,
    cgroups: CgroupDirs,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its container cgroup.
    pub fn cgroup(&self) -> &Path {
        self.cgroups.container()
    }

    fn wait_in_netns(&mut self, netns: &str) -> Result<(), PodProcessError> {
        let pid = self.pid();
        let entered = || PodProcessError::EnterNetns {
            pid,
            netns: netns.to_owned(),
        };
        let target =
            std::fs::metadata(Path::new("/var/run/netns").join(netns)).map_err(|_| entered())?;
        let own_namespace = format!("/proc/{pid}/ns/net");
        let deadline = Instant::now() + ENTER_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(current) = std::fs::metadata(&own_namespace)
                && (current.dev(), current.ino()) == (target.dev(), target.ino())
            {
                return Ok(());
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(POLL);
        }
        Err(entered())
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A container's cgroup and those above it, up to the topology's; dropping it removes them,
/// deepest first, except those another container of the pod still uses.
#[derive(Debug)]
struct CgroupDirs(Vec<PathBuf>);

impl CgroupDirs {
    fn create(root: &Path, names: &[String]) -> Result<Self, PodProcessError> {
        let mut dirs = Self(Vec::with_capacity(names.len()));
        let mut path = root.to_owned();
        for name in names {
            path.push(name);
            if let Err(source) = create_cgroup(&path) {
                return Err(PodProcessError::CreateCgroup { path, source });
            }
            dirs.0.push(path.clone());
        }
        Ok(dirs)
    }

    fn container(&self) -> &Path {
        self.0.last().map_or(Path::new("/"), PathBuf::as_path)
    }
}

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            remove_when_empty(dir);
        }
    }
}

/// Removes the topology cgroups of processes that are gone.
pub(super) fn sweep_leftovers(owner_is_gone: impl Fn(&str) -> bool) {
    for hierarchy in hierarchies().unwrap_or_default() {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            if owner_is_gone(&entry.file_name().to_string_lossy()) {
                remove_tree(&entry.path());
            }
        }
    }
}

/// The hierarchies to make cgroups in, in order of preference: cgroup2, then v1 `pids`.
fn hierarchies() -> Result<Vec<PathBuf>, PodProcessError> {
    let mounts = std::fs::read_to_string(MOUNTINFO).map_err(PodProcessError::ReadMounts)?;
    let mut v2 = Vec::new();
    let mut v1_pids = Vec::new();
    for line in mounts.lines() {
        // `id parent dev root mountpoint options [optional...] - fstype source superoptions`
        let Some((mount, filesystem)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mountpoint) = mount.split(' ').nth(4) else {
            continue;
        };
        let mut filesystem = filesystem.split(' ');
        match (filesystem.next(), filesystem.nth(1)) {
            (Some("cgroup2"), _) => v2.push(PathBuf::from(mountpoint)),
            (Some("cgroup"), Some(options)) if options.split(',').any(|o| o == "pids") => {
                v1_pids.push(PathBuf::from(mountpoint));
            }
            _ => {}
        }
    }
    if v2.is_empty() && v1_pids.is_empty() {
        return Err(PodProcessError::NoHierarchy);
    }
    v2.extend(v1_pids);
    Ok(v2)
}

/// Creates the cgroup `path` unless it exists: the cgroups of a pod are shared by its
/// containers.
fn create_cgroup(path: &Path) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(error) if error.kind() != ErrorKind::AlreadyExists => Err(error),
        _ => Ok(()),
    }
}

/// Kills what runs in the cgroup `path` and below, then removes them, deepest first.
fn remove_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    remove_when_empty(path);
}

/// Kills the processes in the cgroup `path` and removes it once they are gone. One with
/// cgroups below it stays.
fn remove_when_empty(path: &Path) {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        if let Ok(pids) = std::fs::read_to_string(path.join("cgroup.procs")) {
            for pid in pids.lines().filter_map(|pid| pid.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        match std::fs::remove_dir(path) {
            // Busy while a killed process is still exiting.
            Err(error)
                if error.kind() != ErrorKind::NotFound
                    && !has_children(path)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(POLL);
            }
            _ => return,
        }
    }
}

fn has_children(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
    })
}

/// A pod UID for the namespace `netns`: UUID-shaped as Kubernetes makes them, and always the
/// same for the same name.
pub(super) fn uid_for(netns: &str) -> String {
    let (high, low) = (hash(netns, 0), hash(netns, 1));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

fn hash(text: &str, salt: u64) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    salt.hash(&mut hasher);
    text.hash(&mut hasher);
    hasher.finish()
}
