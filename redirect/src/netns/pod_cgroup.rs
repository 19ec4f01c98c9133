//! Telling from a process's `/proc/<pid>/cgroup` which Kubernetes pod it belongs to.
//!
//! kubelet puts every container of a pod under one cgroup named after the pod's UID:
//! - cgroupfs driver: a component `pod<uid>`, as in `/kubepods/besteffort/pod<uid>/<container>`
//!   (Guaranteed pods sit right under `/kubepods`);
//! - systemd driver: a slice ending in `-pod<uid>.slice` with the UID's dashes written as
//!   underscores, as in `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
//!   cri-containerd-<container>.scope` (CRI-O: `crio-<container>.scope`).
//!
//! Paths may carry any prefix: a custom cgroup root, or `/../..` when the reader is in a cgroup
//! namespace of its own.

/// The longest UID accepted; Kubernetes UIDs are 36-character UUIDs.
pub(super) const MAX_UID_LEN: usize = 64;

/// A pod UID that can only be read one way in a cgroup path: hexadecimal digits and dashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct PodUid(String);

impl PodUid {
    /// `None` for a UID with other characters, which could mean something else in a cgroup
    /// path or a slice name, or for an empty or overlong one.
    pub(super) fn parse(uid: &str) -> Option<Self> {
        let valid = uid.len() <= MAX_UID_LEN && is_uid_shaped(uid, b'-');
        valid.then(|| Self(uid.to_owned()))
    }

    /// The pod a process whose cgroup file reads `cgroup_file` belongs to: a line of some
    /// hierarchy (v1 or the v2 `0::` line) places it in the pod's cgroup, and no line places it
    /// in another pod's (hierarchies of cgroup v1 can disagree; then it is nobody's). Malformed
    /// lines place it nowhere.
    pub(super) fn owning(cgroup_file: &str) -> Option<Self> {
        let mut pods = cgroup_file
            .lines()
            .filter_map(cgroup_path)
            .filter_map(outermost_pod)
            .map(|pod| match pod {
                PodCgroup::Cgroupfs(uid) => Self(uid.to_owned()),
                // The systemd driver writes the UID's `-` as `_` in slice names.
                PodCgroup::Systemd(escaped) => Self(escaped.replace('_', "-")),
            });
        let first = pods.next()?;
        pods.all(|pod| pod == first).then_some(first)
    }

    /// Whether a process whose cgroup file reads `cgroup_file` is one of this pod's.
    #[cfg(test)]
    fn owns(&self, cgroup_file: &str) -> bool {
        Self::owning(cgroup_file).as_ref() == Some(self)
    }
}

/// The UID part of a pod's cgroup name, as it appears in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodCgroup<'a> {
    Cgroupfs(&'a str),
    Systemd(&'a str),
}

/// The path of a `hierarchy-id:controllers:path` line.
fn cgroup_path(line: &str) -> Option<&str> {
    let mut fields = line.splitn(3, ':');
    let hierarchy = fields.next()?;
    let _controllers = fields.next()?;
    let path = fields.next()?;
    let well_formed = !hierarchy.is_empty()
        && hierarchy.bytes().all(|b| b.is_ascii_digit())
        && path.starts_with('/');
    well_formed.then_some(path)
}

/// The first pod cgroup on the way down `path`. Only the outermost counts: a container allowed
/// to make cgroups of its own could name one after another pod, but it cannot leave its pod's.
fn outermost_pod(path: &str) -> Option<PodCgroup<'_>> {
    path.split('/').find_map(pod_cgroup)
}

fn pod_cgroup(component: &str) -> Option<PodCgroup<'_>> {
    if let Some(uid) = component.strip_prefix("pod")
        && is_uid_shaped(uid, b'-')
    {
        return Some(PodCgroup::Cgroupfs(uid));
    }
    let (_, escaped) = component.strip_suffix(".slice")?.rsplit_once("-pod")?;
    is_uid_shaped(escaped, b'_').then_some(PodCgroup::Systemd(escaped))
}

fn is_uid_shaped(name: &str, dash: u8) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_hexdigit() || b == dash)
}

#[cfg(test)]
mod tests;
