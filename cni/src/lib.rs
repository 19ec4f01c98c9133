//! `ambit-cni`: the chained CNI plugin (specification 1.0) that has the node agent capture a
//! pod before any of its containers runs, and the protocol the two speak over a Unix socket.
//!
//! The plugin runs after the primary network plugin. On ADD it sends the pod, its network
//! namespace and its addresses ([`Request`]) to the agent at `agentSocket` and passes
//! `prevResult` on only once the agent answers [`Reply::Captured`] or [`Reply::NotInMesh`];
//! anything else fails the ADD (fail closed) and the runtime retries. DEL succeeds even when
//! the agent is down. When the agent is not reachable on ADD, the plugin asks the API server
//! (with `kubeconfig`) whether the pod is in the mesh ([`in_mesh`]) and lets only pods
//! outside it start.
//!
//! Error codes: the specification's 1 (incompatible version), 4 (invalid environment), 5
//! (I/O), 6 (cannot decode the configuration), 7 (invalid configuration), 11 (try again
//! later: the agent is unreachable or slow); this plugin's 100 (the agent reported a
//! failure) and 101 (the agent's reply does not fit the request).

mod agent;
mod apiserver;
mod cni_error;
mod environment;
mod log;
mod membership;
mod netconf;
mod plugin;
mod protocol;
mod unreachable;

pub use membership::{DATAPLANE_MODE_LABEL, SIDECAR_STATUS_ANNOTATION, in_mesh};
pub use plugin::{Outcome, run};
pub use protocol::{
    Command, DEFAULT_AGENT_SOCKET, MAX_MESSAGE_BYTES, Message, PodRef, ProtocolError, Reply,
    Request,
};
