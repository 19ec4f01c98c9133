//! What the admin API answers, as JSON: the agent serializes these and `ambit debug` reads them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use crate::telemetry::{ConnectionView, Direction, Edge};

/// A workload the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    /// Its controller's name, as metrics call it.
    pub workload: String,
    pub identity: Option<String>,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// `HBONE` (in the mesh) or `TCP`.
    pub protocol: String,
    pub labels: BTreeMap<String, String>,
    /// For the pods this agent enrols: `captured` (`captured (cni)` when the CNI plugin reported
    /// its sandbox, rather than the agent finding it), or `pending: <why>` (starting), `failed: <why>`
    /// or `refused: <why>` (the node contradicts the cluster about the pod).
    pub capture: Option<String>,
    /// The waypoint (`namespace/name`) that traffic addressed to the pod goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// `port -> target`, e.g. `80 -> http`.
    pub ports: Vec<String>,
    pub endpoints: Vec<EndpointView>,
    /// The waypoint (`namespace/name`) that traffic addressed to the Service goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub ip: IpAddr,
    pub ready: bool,
    /// How long this agent still leaves it out after it failed a connection, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_s: Option<u64>,
}

/// The policies in force, and those that were rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoliciesView {
    pub policies: Vec<PolicyView>,
    /// Why each rejected policy was rejected; each is enforced as fail-closed.
    pub rejected: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: String,
    /// `namespace/name`.
    pub name: String,
    /// What it applies to: `namespace`, `mesh`, `selector app=x`, `services a,b`.
    pub scope: String,
    /// ALLOW, DENY or AUDIT; for PeerAuthentication, its mTLS mode.
    pub action: String,
    pub dry_run: bool,
    pub rules: usize,
}

/// A certificate the agent holds for one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateView {
    pub identity: String,
    pub serial: Option<String>,
    /// Seconds since the Unix epoch.
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    /// Until `not_after`, at the time of the request.
    pub seconds_left: Option<u64>,
    /// Why the latest renewal failed, if it did.
    pub error: Option<String>,
}

/// The answer to `check`: what would happen to a connection, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub source: PeerView,
    pub destination: PeerView,
    pub port: u16,
    /// `mutual_tls` (the source is in the mesh) or `plaintext`.
    pub transport: String,
    /// For plaintext: the PeerAuthentication mode of the port, and the policy that set it.
    pub peer_authentication: Option<ModeView>,
    /// The waypoints in front of the destination (`namespace/name`): its own, for traffic to
    /// the pod, and its Services', for traffic to them. Connections are meant to come from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<String>,
    /// Every AuthorizationPolicy that applies to the destination.
    pub policies: Vec<PolicyMatch>,
    pub allowed: bool,
    /// The policy that decided, if one did.
    pub decided_by: Option<String>,
    /// In words.
    pub reason: String,
    /// For a destination outside the mesh: whether the source's outbound traffic policy lets it
    /// connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub ip: Option<IpAddr>,
    pub identity: Option<String>,
    /// `namespace/pod`.
    pub workload: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeView {
    pub mode: String,
    pub policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyMatch {
    pub policy: String,
    pub action: String,
    pub dry_run: bool,
    pub matched: bool,
}

/// The log filter, as `/logging` reads and sets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggingView {
    pub level: String,
}

/// What the admin API answers, with a 4xx status, to a request it cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    pub error: String,
}

/// Everything the agent works from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDump {
    pub config: EffectiveConfig,
    pub workloads: Vec<WorkloadView>,
    pub services: Vec<ServiceView>,
    pub policies: PoliciesView,
    pub certificates: Vec<CertificateView>,
}

/// The configuration the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveConfig {
    pub node: String,
    /// `file` or `kubernetes`.
    pub source: String,
    /// The file source's cluster file.
    pub config_file: Option<String>,
    /// The kubernetes source's kubeconfig; `None` in a cluster (in-cluster configuration).
    pub kubeconfig: Option<String>,
    /// Where the CNI plugin is answered, if it is.
    pub cni_socket: Option<String>,
    /// The host's `/proc`: where the kubernetes source finds pods' processes, and capture
    /// writes pods' sysctls (its `sys/net`).
    pub host_proc: String,
    /// The local CA's directory, when certificates are signed in the agent.
    pub ca_dir: Option<String>,
    /// The certificate authority asked for certificates, otherwise.
    pub ca_addr: Option<String>,
    /// How long workload certificates are asked to be valid.
    pub certificate_ttl_seconds: u64,
    pub trust_domain: String,
    pub root_namespace: String,
    /// `--redirect` as given: `ebpf`, `nftables` or `auto`.
    pub redirect: String,
    /// The capture backend in use.
    pub capture: String,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub baseline_learn_seconds: u64,
    pub metrics_series_grace_seconds: u64,
    pub log_format: String,
    pub drain_timeout_seconds: u64,
    pub handover_socket: String,
    pub take_over: bool,
    pub handshake_timeout_seconds: u64,
    pub max_pending_connections: usize,
    pub max_pending_per_source: usize,
    /// `ALLOW_ANY` or `REGISTRY_ONLY`, for pods whose namespace does not say.
    pub outbound_traffic_policy: String,
    pub cluster_domain: String,
    pub dns_upstream: String,
    pub dns_queries_per_second: u32,
}

/// What `ambit debug dns` shows of one pod: its latest DNS answers, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    /// `namespace/name`.
    pub pod: String,
    pub answers: Vec<DnsAnswerView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAnswerView {
    pub name: String,
    /// `A`, `AAAA`, `SRV`...
    pub query_type: String,
    /// `No Error`, `Non-Existent Domain`...
    pub code: String,
    pub addresses: Vec<IpAddr>,
    pub ttl_s: u64,
    /// `mesh` or `upstream`.
    pub source: String,
    pub at_unix: u64,
}

/// Whether the source may reach a destination outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressView {
    /// `ALLOW_ANY` or `REGISTRY_ONLY`.
    pub policy: String,
    pub allowed: bool,
    pub reason: String,
}

/// What `ambit debug agent` shows of an agent this one replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredecessorView {
    pub pid: u32,
    /// `taken over` (this agent has its listeners), `stopped` (it could not hand over), or
    /// `exited`.
    pub state: String,
    /// The sockets it still carries.
    pub open_sockets: u64,
    /// How long until it closes them, as it last said.
    pub deadline_seconds: u64,
}

/// `GET /debug/agent`: this agent, and the one it replaced, if it still drains or just exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub pid: u32,
    pub version: String,
    pub capture: String,
    pub uptime_seconds: u64,
    pub predecessor: Option<PredecessorView>,
}
