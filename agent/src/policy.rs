//! L4 authorization with Istio's semantics: AuthorizationPolicy (who may connect to which port
//! of which workload) and PeerAuthentication (whether a workload accepts plaintext).
//!
//! The users' objects (`model`) are compiled (`compile`) into an engine evaluated for every
//! connection ([`AuthorizationPolicies::decide`], [`PeerAuthentications::decide`]).

pub(crate) mod compile;
mod engine;
mod index;
pub(crate) mod model;

pub use compile::CompileError;
pub use engine::{
    Action, AuthorizationPolicies, AuthorizationPolicy, Cidr, Condition, Connection, Decision,
    Field, HttpRequest, MtlsMode, Operation, PeerAuthentication, PeerAuthentications, PolicyName,
    Rule, Scope, Source, StringMatch,
};

#[cfg(test)]
mod tests;
