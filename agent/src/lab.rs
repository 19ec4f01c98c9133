//! A small cluster in network namespaces on this machine: nodes and pods wired as a CNI would
//! ([`topology`]), a cluster file describing them, an `ambit agent` process per node, and apps
//! inside the pods ([`InPod`]), and pod processes in kubelet-style cgroups ([`PodProcess`]) for
//! finding pods as in a Kubernetes cluster. `ambit demo` shows the mesh with it; the integration
//! tests and benchmarks drive it. Needs root.

mod agent;
mod apiserver;
mod ca;
mod cluster;
mod pod;
mod pod_process;
pub mod topology;
mod waypoint;

pub use agent::AgentProcess;
pub use cluster::{Cluster, ClusterBuilder, ISTIO_CRDS};
pub use pod::{EchoApp, HttpApp, InPod, read_peer_line};
pub use pod_process::{CgroupLayout, PodProcess, PodProcessError};
pub use waypoint::WaypointProcess;
