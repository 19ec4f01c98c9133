//! CAs generated at run time, in Istio's `cacerts` layout.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

/// A CA in Istio's `cacerts` layout, generated at run time.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    files: Vec<(&'static str, String)>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl TestCa {
    /// A root and an intermediate under it that signs.
    pub fn with_intermediate(name: &str) -> anyhow::Result<Self> {
        let root = CertifiedIssuer::self_signed(ca_params(&format!("{name} root")), new_key()?)?;
        let key = new_key()?;
        let intermediate = ca_params(&format!("{name} intermediate")).signed_by(&key, &root)?;
        Ok(Self {
            files: vec![
                ("ca-cert.pem", intermediate.pem()),
                ("ca-key.pem", key.serialize_pem()),
                ("cert-chain.pem", intermediate.pem() + &root.pem()),
                ("root-cert.pem", root.pem()),
            ],
            root: root.der().clone(),
            root_pem: root.pem(),
        })
    }

    /// A root that signs itself.
    pub fn root_only(name: &str) -> anyhow::Result<Self> {
        let key = new_key()?;
        let root = ca_params(&format!("{name} root")).self_signed(&key)?;
        Ok(Self {
            files: vec![
                ("ca-cert.pem", root.pem()),
                ("ca-key.pem", key.serialize_pem()),
                ("cert-chain.pem", root.pem()),
                ("root-cert.pem", root.pem()),
            ],
            root: root.der().clone(),
            root_pem: root.pem(),
        })
    }

    /// The root certificates chain to.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root, as `root-cert.pem` holds it.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The files of a CA directory: name and contents.
    pub(super) fn files(&self) -> &[(&'static str, String)] {
        &self.files
    }
}

/// ECDSA P-256, the key type of ambit's and Istio's CAs.
fn new_key() -> anyhow::Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}
