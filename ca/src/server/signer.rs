//! Signing an authorized request, and the certificate chain of the response in the shape
//! ztunnel reads: the leaf, each intermediate on its own, then every root in one last element.

use std::time::Duration;

use ambit_identity::{Identity, LocalCa, SignRequestError, certificate_serial};
use rustls_pki_types::CertificateDer;
use tonic::Code;

use super::refusal::Refusal;
use crate::pem::certificate_pem;

/// A signed certificate, ready to answer with.
#[derive(Debug)]
pub(crate) struct Issued {
    /// The response's `cert_chain`.
    pub(crate) cert_chain: Vec<String>,
    /// The leaf's serial number, for the log.
    pub(crate) serial: String,
}

impl From<SignRequestError> for Refusal {
    fn from(error: SignRequestError) -> Self {
        let (code, reason) = match &error {
            SignRequestError::Parse(_) | SignRequestError::NotAnIdentity(_) => {
                (Code::InvalidArgument, "invalid_csr")
            }
            SignRequestError::IdentityMismatch { .. } => {
                (Code::InvalidArgument, "csr_identity_mismatch")
            }
            SignRequestError::Sign(_) => (Code::Internal, "sign_failed"),
        };
        Self::new(code, reason, &error)
    }
}

/// Signs the key of `csr` into a certificate for `identity`, valid for `ttl`.
pub(crate) fn sign(
    ca: &LocalCa,
    csr: &str,
    identity: &Identity,
    ttl: Duration,
) -> Result<Issued, SignRequestError> {
    let chain = ca.sign_request(csr, identity, ttl)?;
    let serial = chain
        .first()
        .and_then(|leaf| certificate_serial(leaf).ok())
        .unwrap_or_default();
    Ok(Issued {
        cert_chain: response_chain(&chain, ca.roots()),
        serial,
    })
}

/// `chain` (leaf first, then the CA's chain) as the response carries it: one PEM element per
/// certificate that is not a root, then all of `roots` concatenated into the last element.
fn response_chain(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> Vec<String> {
    let mut elements: Vec<String> = chain
        .iter()
        .filter(|certificate| !roots.contains(certificate))
        .map(|certificate| certificate_pem(certificate))
        .collect();
    elements.push(
        roots
            .iter()
            .map(|root| certificate_pem(root))
            .collect::<String>(),
    );
    elements
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;

    use super::*;

    fn der(byte: u8) -> CertificateDer<'static> {
        CertificateDer::from(vec![byte; 3])
    }

    #[test]
    fn intermediates_each_get_an_element_and_the_roots_share_the_last() {
        let (leaf, intermediate, root, other_root) = (der(1), der(2), der(3), der(4));
        let elements = response_chain(
            &[leaf.clone(), intermediate.clone(), root.clone()],
            &[root.clone(), other_root.clone()],
        );
        assert_eq!(
            elements,
            [
                certificate_pem(&leaf),
                certificate_pem(&intermediate),
                certificate_pem(&root) + &certificate_pem(&other_root),
            ]
        );
    }

    #[test]
    fn a_ca_that_is_its_own_root_gives_leaf_and_root() {
        let (leaf, root) = (der(1), der(3));
        let elements = response_chain(&[leaf.clone(), root.clone()], std::slice::from_ref(&root));
        assert_eq!(elements, [certificate_pem(&leaf), certificate_pem(&root)]);
    }

    #[test]
    fn signs_for_the_identity_with_the_serial_of_the_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &"cluster.local".parse().unwrap()).unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.as_str().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let issued = sign(&ca, &csr, &identity, Duration::from_secs(600)).unwrap();
        assert_eq!(issued.cert_chain.len(), 2);
        assert_eq!(issued.cert_chain[1], certificate_pem(&ca.roots()[0]));
        let leaf = CertificateDer::from_pem_slice(issued.cert_chain[0].as_bytes()).unwrap();
        assert_eq!(issued.serial, certificate_serial(&leaf).unwrap());
        assert!(!issued.serial.is_empty());
    }
}
