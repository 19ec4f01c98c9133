//! Istio's certificate service, `istio.v1.auth.IstioCertificateService/CreateCertificate`: the
//! agent's client ([`client`]) and the server of `ambit ca` ([`CaServer`], configured by
//! [`ServerConfig`]).

pub mod client;
mod pem;
mod server;

pub use server::{
    ApiCallError, CaServer, CreateRoot, LoadCaError, NamespacedName, ObjectName, ObjectNameError,
    RootSecretError, ServerConfig, ServiceAccount, ServiceAccountError, ServingError, ServingName,
    ServingNameError, StartError, TtlPolicy, TtlPolicyError,
};

pub mod proto {
    //! The messages and stubs generated from `proto/ca.proto`.
    #![allow(
        unreachable_pub,
        missing_debug_implementations,
        unused_qualifications,
        clippy::allow_attributes,
        reason = "generated code"
    )]
    tonic::include_proto!("istio.v1.auth");
}

/// The metadata key of the request's `metadata` struct that names the identity a node agent
/// asks for on behalf of a workload on its node.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The gRPC metadata (HTTP/2 header) naming the caller's cluster, as ztunnel sends it.
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// The cluster name Istio uses when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The audience callers' service-account tokens are bound to, as for istiod's CA.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The port istiod serves its CA on.
pub const DEFAULT_PORT: u16 = 15012;
