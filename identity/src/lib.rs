//! Workload identity for ambit.
//!
//! Owns the parsed SPIFFE ID of a workload ([`Identity`], [`TrustDomain`]), the certificates
//! that prove it ([`WorkloadCertificate`]), where they come from ([`CertificateProvider`], with
//! the in-process [`LocalCa`]), how they are kept fresh ([`CertificateManager`]), and the rustls
//! configurations that HBONE peers use to authenticate each other ([`server_config`],
//! [`client_config`]). No `unsafe` here.

mod certificate;
mod local_ca;
mod manager;
mod provider;
mod spiffe;
mod tls;

pub use certificate::{
    CertificateError, WorkloadCertificate, certificate_identity, certificate_not_after,
    certificate_serial,
};
pub use local_ca::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CaDirContents, DEFAULT_WORKLOAD_TTL, LocalCa,
    LocalCaError, ROOT_CERT_FILE, SignRequestError,
};
pub use manager::{CertificateManager, CertificateStatus, FetchError, RequestCounts};
pub use provider::{CertificateProvider, IssueError, IssueFuture};
pub use spiffe::{Identity, IdentityError, TrustDomain};
pub use tls::{
    ALPN_H2, CRYPTO_PROVIDER_NAME, PeerVerifyError, client_config, crypto_provider, server_config,
};
