use super::PodUid;

const UID: &str = "0b5f3c2e-8a4d-4e7b-9c1a-2f6d8e0a1b3c";
const UID_ESCAPED: &str = "0b5f3c2e_8a4d_4e7b_9c1a_2f6d8e0a1b3c";
const CONTAINER: &str = "4f7a1c9e2b8d6f3a5c0e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a";

fn pod() -> PodUid {
    PodUid::parse(UID).unwrap_or_else(|| panic!("{UID} is a valid uid"))
}

fn v2(path: &str) -> String {
    format!("0::{path}\n")
}

#[test]
fn cgroupfs_layout_for_every_qos_class() {
    for qos in ["/kubepods", "/kubepods/burstable", "/kubepods/besteffort"] {
        let file = v2(&format!("{qos}/pod{UID}/{CONTAINER}"));
        assert!(pod().owns(&file), "{file}");
    }
}

#[test]
fn systemd_layout_for_every_qos_class_and_runtime() {
    let slices = [
        format!("/kubepods.slice/kubepods-pod{UID_ESCAPED}.slice"),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_ESCAPED}.slice"
        ),
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_ESCAPED}.slice"
        ),
    ];
    for slice in &slices {
        for scope in ["cri-containerd", "crio", "crio-conmon"] {
            let file = v2(&format!("{slice}/{scope}-{CONTAINER}.scope"));
            assert!(pod().owns(&file), "{file}");
        }
        assert!(pod().owns(&v2(slice)), "{slice}");
    }
}

#[test]
fn any_prefix_before_the_pod_cgroup() {
    for path in [
        format!("/../../pod{UID}/{CONTAINER}"),
        format!("/../../../kubepods-besteffort-pod{UID_ESCAPED}.slice/crio-{CONTAINER}.scope"),
        format!("/custom-root/kubepods/besteffort/pod{UID}/{CONTAINER}"),
    ] {
        assert!(pod().owns(&v2(&path)), "{path}");
    }
}

#[test]
fn the_uid_must_be_written_the_way_the_layout_writes_it() {
    // cgroupfs keeps the dashes, systemd turns them into underscores: not the other way round.
    let cgroupfs_escaped = v2(&format!(
        "/kubepods/besteffort/pod{UID_ESCAPED}/{CONTAINER}"
    ));
    let systemd_unescaped = v2(&format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID}.slice"
    ));
    assert!(!pod().owns(&cgroupfs_escaped));
    assert!(!pod().owns(&systemd_unescaped));
}

#[test]
fn a_uid_that_is_a_prefix_or_suffix_of_another_does_not_match() {
    let short = PodUid::parse("0b5f3c2e").unwrap_or_else(|| panic!("valid uid"));
    let tail = PodUid::parse("2f6d8e0a1b3c").unwrap_or_else(|| panic!("valid uid"));
    for file in [
        v2(&format!("/kubepods/besteffort/pod{UID}/{CONTAINER}")),
        v2(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_ESCAPED}.slice"
        )),
    ] {
        assert!(!short.owns(&file), "{file}");
        assert!(!tail.owns(&file), "{file}");
    }
}

#[test]
fn processes_outside_any_pod_are_nobody_s() {
    for file in [
        "0::/\n",
        "0::/system.slice/kubelet.service\n",
        "0::/kubepods.slice/kubepods-besteffort.slice\n",
        "0::/kubepods/besteffort\n",
        "0::/user.slice/user-0.slice/session-1.scope\n",
        "0::/podman-1234.scope\n",
    ] {
        assert!(!pod().owns(file), "{file}");
    }
}

#[test]
fn only_the_outermost_pod_cgroup_counts() {
    // Another pod's container that made a cgroup of its own named after this pod.
    let other = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a";
    let nested = v2(&format!(
        "/kubepods/besteffort/pod{other}/{CONTAINER}/pod{UID}"
    ));
    assert!(!pod().owns(&nested));
}

#[test]
fn hybrid_v1_and_v2_lines() {
    let in_v1_only = format!(
        "12:pids:/kubepods/besteffort/pod{UID}/{CONTAINER}\n\
         11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CONTAINER}\n\
         1:name=systemd:/kubepods/besteffort/pod{UID}/{CONTAINER}\n\
         0::/\n"
    );
    let in_v2_only = format!(
        "9:name=systemd:/\n8:pids:/\n0::/kubepods.slice/kubepods-pod{UID_ESCAPED}.slice/cri-containerd-{CONTAINER}.scope\n"
    );
    assert!(pod().owns(&in_v1_only));
    assert!(pod().owns(&in_v2_only));
}

#[test]
fn hierarchies_that_name_two_pods_make_the_process_nobody_s() {
    let other = "9f0e1d2c-3b4a-5968-7f8e-9d0c1b2a3f4e";
    let split = format!(
        "12:pids:/kubepods/besteffort/pod{UID}/{CONTAINER}\n\
         0::/kubepods/besteffort/pod{other}/{CONTAINER}\n"
    );
    assert!(!pod().owns(&split));
    assert!(
        !PodUid::parse(other)
            .unwrap_or_else(|| panic!("{other}"))
            .owns(&split)
    );
}

#[test]
fn malformed_lines_place_the_process_nowhere() {
    let path = format!("/kubepods/besteffort/pod{UID}/{CONTAINER}");
    for file in [
        String::new(),
        "\n\n".to_owned(),
        format!("{path}\n"),
        format!("0:{path}\n"),
        format!("x::{path}\n"),
        format!(":pids:{path}\n"),
        format!("0::kubepods/pod{UID}\n"),
    ] {
        assert!(!pod().owns(&file), "{file:?}");
    }
    // A malformed line does not hide a good one.
    assert!(pod().owns(&format!("garbage\n0::{path}\n")));
}

#[test]
fn uids_that_could_mean_something_else_in_a_path_are_refused() {
    for uid in [
        "",
        "../pod",
        "a/b",
        "0b5f_3c2e",
        "0b5f.slice",
        "pod0b5f",
        "0b5f 3c2e",
        "0b5f\n0::/",
        "g123",
        &"a".repeat(65),
    ] {
        assert!(PodUid::parse(uid).is_none(), "{uid:?}");
    }
    assert!(PodUid::parse(&UID.to_uppercase()).is_some());
    assert!(PodUid::parse(&"a".repeat(64)).is_some());
}
