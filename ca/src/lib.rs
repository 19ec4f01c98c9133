//! Istio's certificate service, `istio.v1.auth.IstioCertificateService/CreateCertificate`.

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
