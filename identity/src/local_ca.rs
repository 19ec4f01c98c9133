//! A certificate authority in this process, kept in Istio's `cacerts` directory layout.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::certificate::WorkloadCertificate;
use crate::provider::{CertificateProvider, IssueError, IssueFuture};
use crate::spiffe::{Identity, TrustDomain};
use crate::tls::crypto_provider;

/// The signing certificate (the root itself, or an intermediate).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing key, PKCS#8.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust bundle handed to workloads.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The chain from the signing certificate up to the root, appended to every workload chain.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

const FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE];

/// Workload certificates live a day unless configured otherwise, as in Istio.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Tolerates clocks that run a little behind the CA's.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why the CA directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("failed to read the CA directory {}", .0.display())]
    ReadDir(PathBuf, #[source] io::Error),
    #[error(
        "the CA directory {} is incomplete: {missing:?} missing; it must hold all of {FILES:?}, or be empty",
        dir.display()
    )]
    Incomplete {
        dir: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error("failed to read {}", .0.display())]
    ReadFile(PathBuf, #[source] io::Error),
    #[error("failed to write {}", .0.display())]
    WriteFile(PathBuf, #[source] io::Error),
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} is not a PEM certificate list", .0.display())]
    ParseCertificates(PathBuf, #[source] rustls_pki_types::pem::Error),
    #[error("{} is not a usable PKCS#8 CA key", .0.display())]
    ParseKey(PathBuf, #[source] rcgen::Error),
    #[error("{} is not a usable CA certificate", .0.display())]
    ParseCaCert(PathBuf, #[source] rcgen::Error),
    #[error("failed to create a self-signed root")]
    CreateRoot(#[source] rcgen::Error),
    #[error("in {}, the key of {CA_KEY_FILE} is not the key of {CA_CERT_FILE}", .0.display())]
    KeyMismatch(PathBuf),
}

/// The four files of a `cacerts` directory, read together: what [`LocalCa::from_contents`]
/// loads, and what a reloading CA compares to see whether the directory changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaDirContents {
    dir: PathBuf,
    /// In the order of `FILES`; the kind of error for a file that could not be read.
    files: [Result<Vec<u8>, io::ErrorKind>; 4],
}

impl CaDirContents {
    pub fn read(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: FILES.map(|file| fs::read(dir.join(file)).map_err(|e| e.kind())),
        }
    }

    /// Whether none of the files is there.
    pub fn is_empty(&self) -> bool {
        self.files.iter().all(|file| {
            file.as_ref()
                .is_err_and(|kind| *kind == io::ErrorKind::NotFound)
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn text(&self, file: &str) -> Result<&str, LocalCaError> {
        let index = FILES.iter().position(|f| *f == file).unwrap_or_default();
        match &self.files[index] {
            Ok(bytes) => std::str::from_utf8(bytes).map_err(|_| {
                LocalCaError::ReadFile(self.path(file), io::ErrorKind::InvalidData.into())
            }),
            Err(kind) => Err(LocalCaError::ReadFile(self.path(file), (*kind).into())),
        }
    }

    fn certificates(&self, file: &str) -> Result<Vec<CertificateDer<'static>>, LocalCaError> {
        let certs = CertificateDer::pem_slice_iter(self.text(file)?.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LocalCaError::ParseCertificates(self.path(file), e))?;
        if certs.is_empty() {
            return Err(LocalCaError::NoCertificate(self.path(file)));
        }
        Ok(certs)
    }
}

/// Whether the signing key is the one the CA certificate certifies.
fn key_fits_certificate(issuer: &Issuer<'_, KeyPair>, ca_pem: &str) -> bool {
    CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .ok()
        .and_then(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            Some(*cert.public_key().subject_public_key.data == *issuer.key().der_bytes())
        })
        .unwrap_or(false)
}

/// Signs workload certificates with a CA key held in process.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and its chain up to the root.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    workload_ttl: Duration,
}

impl LocalCa {
    /// Loads the CA from `dir` or, when `dir` is empty or absent, creates a self-signed root for
    /// `trust_domain` there. A directory with only some of the files is an error, never
    /// overwritten.
    pub fn load_or_create(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, LocalCaError> {
        let present: Vec<&str> = FILES.into_iter().filter(|f| dir.join(f).exists()).collect();
        if present.is_empty() {
            create_root(dir, trust_domain)?;
        } else if present.len() < FILES.len() {
            return Err(LocalCaError::Incomplete {
                dir: dir.to_owned(),
                missing: FILES.into_iter().filter(|f| !present.contains(f)).collect(),
            });
        }
        Self::load(dir)
    }

    /// Loads the CA from `dir`, which must hold all four files.
    pub fn load(dir: &Path) -> Result<Self, LocalCaError> {
        Self::from_contents(&CaDirContents::read(dir))
    }

    /// The CA of files read at one moment, so that a directory replaced meanwhile cannot
    /// mix the key of one CA with the certificate of another.
    pub fn from_contents(contents: &CaDirContents) -> Result<Self, LocalCaError> {
        let key_pem = contents.text(CA_KEY_FILE)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| LocalCaError::ParseKey(contents.path(CA_KEY_FILE), e))?;
        let ca_pem = contents.text(CA_CERT_FILE)?;
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)
            .map_err(|e| LocalCaError::ParseCaCert(contents.path(CA_CERT_FILE), e))?;
        if !key_fits_certificate(&issuer, ca_pem) {
            return Err(LocalCaError::KeyMismatch(contents.dir.clone()));
        }
        Ok(Self {
            issuer,
            chain: contents.certificates(CERT_CHAIN_FILE)?,
            roots: contents.certificates(ROOT_CERT_FILE)?,
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        })
    }

    /// Sets how long the certificates this CA issues are valid.
    pub fn with_workload_ttl(mut self, ttl: Duration) -> Self {
        self.workload_ttl = ttl;
        self
    }

    /// The trust bundle: the roots that workload certificates chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The signing certificate and its chain up to the root, as `cert-chain.pem` holds it.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs a certificate for `identity` over a freshly generated ECDSA P-256 key.
    pub fn sign(&self, identity: &Identity) -> Result<WorkloadCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let chain = self
            .certify(&key, identity, self.workload_ttl)
            .map_err(IssueError::Sign)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(chain, key, &self.roots, &crypto_provider())
            .map_err(IssueError::Unusable)
    }

    /// Signs a certificate for `identity`, valid for `ttl`, over the public key of a PEM
    /// certificate signing request; the request must be signed by its key and ask for exactly
    /// that identity. Returns the chain, leaf first. Nothing else the request asks for is
    /// copied: the certificate is an Istio workload certificate whatever it says.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, SignRequestError> {
        let request =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignRequestError::Parse)?;
        let requested = request_identities(&request.params)?;
        if requested.as_slice() != std::slice::from_ref(identity) {
            return Err(SignRequestError::IdentityMismatch {
                requested,
                authorized: identity.clone(),
            });
        }
        self.certify(&request.public_key, identity, ttl)
            .map_err(SignRequestError::Sign)
    }

    /// A TLS server certificate for `names` (DNS names and IP addresses), valid for `ttl`, over
    /// a freshly generated ECDSA P-256 key: how a server run by the CA itself, such as the
    /// certificate service, proves its name to clients that trust the CA's roots. Returns the
    /// chain, leaf first, and the key.
    pub fn issue_server_certificate(
        &self,
        names: &[ServerName<'_>],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let chain = self.chain_for(server_params(names, ttl)?, &key)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }

    /// A workload certificate for `identity` over `public_key`, followed by the CA's chain.
    fn certify(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, rcgen::Error> {
        self.chain_for(workload_params(identity, ttl)?, public_key)
    }

    /// A certificate of `params` over `public_key`, followed by the CA's chain.
    fn chain_for(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<Vec<CertificateDer<'static>>, rcgen::Error> {
        let leaf = params.signed_by(public_key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }
}

/// Why a certificate signing request was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignRequestError {
    #[error("the CSR is not a PEM certificate request signed by its own key")]
    Parse(#[source] rcgen::Error),
    #[error("the CSR asks for a name that is not a workload identity: {0:?}")]
    NotAnIdentity(String),
    #[error("the CSR asks for {requested:?}; the caller may have exactly {authorized}")]
    IdentityMismatch {
        requested: Vec<Identity>,
        authorized: Identity,
    },
    #[error("failed to sign the certificate")]
    Sign(#[source] rcgen::Error),
}

/// The identities a request's subject alternative names ask for; any other kind of name is
/// refused.
fn request_identities(params: &CertificateParams) -> Result<Vec<Identity>, SignRequestError> {
    params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(uri) => uri
                .as_str()
                .parse()
                .map_err(|_| SignRequestError::NotAnIdentity(shortened(uri.as_str()))),
            other => Err(SignRequestError::NotAnIdentity(shortened(&format!(
                "{other:?}"
            )))),
        })
        .collect()
}

impl CertificateProvider for LocalCa {
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a> {
        Box::pin(async move { self.sign(identity) })
    }
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("workload_ttl", &self.workload_ttl)
            .finish_non_exhaustive()
    }
}

/// An Istio-style workload certificate: empty subject, one URI SAN (critical), serverAuth and
/// clientAuth.
fn workload_params(identity: &Identity, ttl: Duration) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, ttl);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A TLS server certificate: the names as SANs (the first also as common name), serverAuth.
fn server_params(
    names: &[ServerName<'_>],
    ttl: Duration,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = names
        .iter()
        .map(|name| match name {
            ServerName::DnsName(dns) => Ok(SanType::DnsName(dns.as_ref().try_into()?)),
            ServerName::IpAddress(ip) => Ok(SanType::IpAddress(IpAddr::from(*ip))),
            // `ServerName` may grow variants; a name that cannot be certified is refused.
            _ => Err(rcgen::Error::InvalidNameType),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    if let Some(ServerName::DnsName(first)) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_ref());
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, ttl);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn create_root(dir: &Path, trust_domain: &TrustDomain) -> Result<(), LocalCaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(LocalCaError::CreateRoot)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, "ambit root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, ROOT_TTL);
    params.serial_number = Some(random_serial().map_err(LocalCaError::CreateRoot)?);
    let cert = params.self_signed(&key).map_err(LocalCaError::CreateRoot)?;

    fs::create_dir_all(dir).map_err(|e| LocalCaError::ReadDir(dir.to_owned(), e))?;
    write(&dir.join(CA_KEY_FILE), &key.serialize_pem(), 0o600)?;
    for file in [CA_CERT_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        write(&dir.join(file), &cert.pem(), 0o644)?;
    }
    Ok(())
}

/// Valid from a little before now for `ttl`, or until the latest time X.509 can say.
fn set_validity(params: &mut CertificateParams, ttl: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| now.checked_add(ttl))
        .unwrap_or(PrimitiveDateTime::MAX.assume_utc());
}

/// A name from a request, cut short: it goes into error messages and logs.
fn shortened(name: &str) -> String {
    const LONGEST: usize = 256;
    match name.char_indices().nth(LONGEST) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.to_owned(),
    }
}

/// A positive 127-bit serial from the system's secure random source, as RFC 5280 asks (at
/// most 20 octets, unpredictable).
fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0; 16];
    crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), LocalCaError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| LocalCaError::WriteFile(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust_domain() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    #[test]
    fn creates_a_root_in_an_empty_directory_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let created = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        for file in FILES {
            assert!(dir.path().join(file).is_file(), "{file} was not written");
        }
        let reloaded = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        assert_eq!(created.roots(), reloaded.roots());
    }

    #[test]
    fn a_presented_certificate_tells_when_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        let identity = Identity::new(&trust_domain(), "shop", "web").unwrap();
        let certificate = ca.sign(&identity).unwrap();
        let leaf = &certificate.certified_key().cert[0];
        assert_eq!(
            crate::certificate_not_after(leaf).unwrap(),
            certificate.not_after()
        );
    }

    #[test]
    fn ca_key_is_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_an_incomplete_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_CERT_FILE), "").unwrap();
        let err = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap_err();
        assert!(
            matches!(&err, LocalCaError::Incomplete { missing, .. } if missing.len() == 3),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(),
            ""
        );
    }

    #[test]
    fn refuses_the_key_of_another_ca() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        LocalCa::load_or_create(other.path(), &trust_domain()).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = LocalCa::load(dir.path()).unwrap_err();
        assert!(matches!(err, LocalCaError::KeyMismatch(_)), "{err}");
    }

    #[test]
    fn refuses_a_key_that_is_not_pem() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        let err = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap_err();
        assert!(matches!(err, LocalCaError::ParseKey(..)), "{err}");
    }

    #[test]
    fn issues_istio_shaped_workload_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain())
            .unwrap()
            .with_workload_ttl(Duration::from_secs(3600));
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let cert = ca.sign(&identity).unwrap();
        assert_eq!(cert.identity(), &identity);
        assert_eq!(cert.lifetime(), Duration::from_secs(3600) + CLOCK_SKEW);
        assert_eq!(
            cert.certified_key().cert.len(),
            2,
            "leaf and CA certificate"
        );

        let der = cert.certified_key().end_entity_cert().unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(der).unwrap();
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(leaf.subject_alternative_name().unwrap().unwrap().critical);
        assert!(!leaf.is_ca());
    }
    fn request(sans: &[SanType]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn uri(identity: &str) -> SanType {
        SanType::URI(identity.try_into().unwrap())
    }

    #[test]
    fn signs_the_key_of_a_request_for_exactly_the_authorized_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let (key, csr) = request(&[uri(identity.as_str())]);
        let chain = ca
            .sign_request(&csr, &identity, Duration::from_secs(60))
            .unwrap();
        assert_eq!(&chain[1..], ca.chain());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = WorkloadCertificate::new(chain, key, ca.roots(), &crypto_provider()).unwrap();
        assert_eq!(cert.identity(), &identity);
        assert_eq!(cert.lifetime(), Duration::from_secs(60) + CLOCK_SKEW);
    }

    #[test]
    fn refuses_a_request_for_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let ttl = Duration::from_secs(60);
        let sign = |sans: &[SanType]| ca.sign_request(&request(sans).1, &web, ttl).unwrap_err();

        let other = uri("spiffe://cluster.local/ns/shop/sa/db");
        assert!(matches!(
            sign(std::slice::from_ref(&other)),
            SignRequestError::IdentityMismatch { .. }
        ));
        assert!(matches!(
            sign(&[uri(web.as_str()), other]),
            SignRequestError::IdentityMismatch { .. }
        ));
        assert!(matches!(
            sign(&[]),
            SignRequestError::IdentityMismatch { .. }
        ));
        let dns = SanType::DnsName("web.shop.svc".try_into().unwrap());
        assert!(matches!(
            sign(&[uri(web.as_str()), dns]),
            SignRequestError::NotAnIdentity(_)
        ));
        assert!(matches!(
            ca.sign_request("not a request", &web, ttl).unwrap_err(),
            SignRequestError::Parse(_)
        ));
    }

    #[test]
    fn issues_server_certificates_for_names_and_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain()).unwrap();
        let names = [
            ServerName::try_from("ambit-ca.ambit-system.svc").unwrap(),
            ServerName::from(IpAddr::from([127, 0, 0, 1])),
        ];
        let (chain, _key) = ca
            .issue_server_certificate(&names, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(&chain[1..], ca.chain());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            sans,
            [
                "DNSName(ambit-ca.ambit-system.svc)",
                "IPAddress(7f:00:00:01)"
            ]
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.is_ca());
    }
}
