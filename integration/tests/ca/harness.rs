//! What the tests of `ambit ca` run it with: the fake API server and its cluster, CAs
//! generated for the test, a CA directory laid out as a mounted Secret, `ambit ca` as a child
//! process, and certificate requests with the checks of their answers.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use ambit_ca::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_ca::proto::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_integration::{FakeApiServer, FakeApiServerConfig, agent_binary};
use anyhow::{Context as _, bail, ensure};
use hyper_util::rt::TokioIo;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use x509_parser::extensions::GeneralName;

const OBJECTS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: ambit-node1, namespace: ambit-system, uid: uid-ambit-node1}
spec: {nodeName: node1, serviceAccountName: ambit, containers: [{name: agent, image: ambit}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: ambit-node2, namespace: ambit-system, uid: uid-ambit-node2}
spec: {nodeName: node2, serviceAccountName: ambit, containers: [{name: agent, image: ambit}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: uid-web}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, uid: uid-db}
spec: {nodeName: node2, serviceAccountName: db, containers: [{name: db, image: db}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata:
  name: static-node1
  namespace: payments
  uid: uid-static
  annotations: {kubernetes.io/config.mirror: abc}
spec: {nodeName: node1, containers: [{name: static, image: static}]}
status: {phase: Running}
";

const TOKENS: &str = "
- token: node1
  username: system:serviceaccount:ambit-system:ambit
  extra:
    authentication.kubernetes.io/pod-name: [ambit-node1]
    authentication.kubernetes.io/pod-uid: [uid-ambit-node1]
  audiences: [istio-ca]
- token: node1-of-a-deleted-pod
  username: system:serviceaccount:ambit-system:ambit
  extra:
    authentication.kubernetes.io/pod-name: [ambit-node1]
    authentication.kubernetes.io/pod-uid: [uid-of-an-earlier-ambit-node1]
  audiences: [istio-ca]
- token: node1-expired
  username: system:serviceaccount:ambit-system:ambit
  extra:
    authentication.kubernetes.io/pod-name: [ambit-node1]
    authentication.kubernetes.io/pod-uid: [uid-ambit-node1]
  audiences: [istio-ca]
  expiresAt: 2020-01-01T00:00:00Z
- token: node1-for-the-api-server
  username: system:serviceaccount:ambit-system:ambit
  extra:
    authentication.kubernetes.io/pod-name: [ambit-node1]
    authentication.kubernetes.io/pod-uid: [uid-ambit-node1]
  audiences: [https://kubernetes.default.svc]
- token: web
  username: system:serviceaccount:shop:web
  extra:
    authentication.kubernetes.io/pod-name: [web]
    authentication.kubernetes.io/pod-uid: [uid-web]
  audiences: [istio-ca]
- token: db
  username: system:serviceaccount:shop:db
  extra:
    authentication.kubernetes.io/pod-name: [db]
    authentication.kubernetes.io/pod-uid: [uid-db]
  audiences: [istio-ca]
";

/// A CA in Istio's `cacerts` layout, generated for the test.
pub(crate) struct TestCa {
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    pub(crate) files: Vec<(&'static str, String)>,
    pub(crate) root: CertificateDer<'static>,
}

impl TestCa {
    /// A root and an intermediate under it that signs.
    pub(crate) fn with_intermediate(name: &str) -> anyhow::Result<Self> {
        let root =
            CertifiedIssuer::self_signed(ca_params(&format!("{name} root")), KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let intermediate = ca_params(&format!("{name} intermediate")).signed_by(&key, &root)?;
        Ok(Self {
            files: vec![
                ("ca-cert.pem", intermediate.pem()),
                ("ca-key.pem", key.serialize_pem()),
                ("cert-chain.pem", intermediate.pem() + &root.pem()),
                ("root-cert.pem", root.pem()),
            ],
            root: root.der().clone(),
        })
    }

    /// A root that signs itself.
    pub(crate) fn root_only(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let root = ca_params(&format!("{name} root")).self_signed(&key)?;
        Ok(Self {
            files: vec![
                ("ca-cert.pem", root.pem()),
                ("ca-key.pem", key.serialize_pem()),
                ("cert-chain.pem", root.pem()),
                ("root-cert.pem", root.pem()),
            ],
            root: root.der().clone(),
        })
    }
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

/// A directory laid out as the kubelet mounts a Secret: each file a symlink through `..data`,
/// a symlink to the current version, swapped to change every file at once.
pub(crate) struct SecretDir {
    pub(crate) path: PathBuf,
    versions: u32,
}

impl SecretDir {
    pub(crate) fn write(&mut self, files: &[(&'static str, String)]) -> anyhow::Result<()> {
        self.versions += 1;
        let version = format!("..version-{}", self.versions);
        fs::create_dir(self.path.join(&version))?;
        for (name, contents) in files {
            fs::write(self.path.join(&version).join(name), contents)?;
        }
        let staged = self.path.join("..data_tmp");
        symlink(&version, &staged)?;
        fs::rename(&staged, self.path.join("..data"))?;
        for (name, _) in files {
            let link = self.path.join(name);
            if link.symlink_metadata().is_err() {
                symlink(Path::new("..data").join(name), link)?;
            }
        }
        Ok(())
    }
}
/// The fake API server, in this process, serving [`OBJECTS`] and more, and reviewing
/// [`TOKENS`]; its files and the CAs' live in `dir`.
pub(crate) struct ApiServer {
    pub(crate) dir: tempfile::TempDir,
}

impl ApiServer {
    /// Serves [`OBJECTS`] followed by `more_objects` (YAML documents).
    pub(crate) async fn start(more_objects: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = |name: &str| dir.path().join(name);
        fs::write(path("objects.yaml"), format!("{OBJECTS}{more_objects}"))?;
        fs::write(path("tokens.yaml"), TOKENS)?;
        let apiserver = FakeApiServer::bind(FakeApiServerConfig {
            objects: path("objects.yaml"),
            listen: "127.0.0.1:0".parse()?,
            kubeconfig_out: path("kubeconfig"),
            tokens: Some(path("tokens.yaml")),
            history: 100,
            bookmark_interval: Duration::from_secs(1),
            watch_delay: Duration::ZERO,
            poll_interval: Duration::from_millis(100),
        })
        .await?;
        tokio::spawn(apiserver.run());
        Ok(Self { dir })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client of the API server, as the test itself.
    pub(crate) async fn client(&self) -> anyhow::Result<kube::Client> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(self.path("kubeconfig"))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// `ambit ca` as a child process, killed when dropped.
pub(crate) struct CaProcess {
    child: Child,
    pub(crate) listen: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl CaProcess {
    /// Starts `ambit ca` on `ca_dir` against `api`, with `flags` besides the usual ones, logging
    /// to `<name>.log`; returns at once.
    pub(crate) fn spawn(
        api: &ApiServer,
        name: &str,
        ca_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let binary = agent_binary();
        ensure!(
            binary.exists(),
            "{} is missing: build it first (cargo build -p ambit-agent) or set AMBIT_BIN",
            binary.display()
        );
        let log = api.path(&format!("{name}.log"));
        let (listen, metrics) = (free_port()?, free_port()?);
        let child = Command::new(binary)
            .arg("ca")
            .args(["--listen", &listen.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--ca-dir")
            .arg(ca_dir)
            .arg("--kubeconfig")
            .arg(api.path("kubeconfig"))
            .args(["--server-names", "localhost,127.0.0.1"])
            .args(["--default-ttl", "1h", "--max-ttl", "2h"])
            .args(flags)
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting ambit ca")?;
        Ok(Self {
            child,
            listen,
            metrics,
            log,
        })
    }

    /// [`spawn`](Self::spawn), then waits until it listens.
    pub(crate) async fn start(
        api: &ApiServer,
        name: &str,
        ca_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut ca = Self::spawn(api, name, ca_dir, flags)?;
        ca.wait_listening().await?;
        Ok(ca)
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("ambit ca exited with {status}:\n{}", self.log());
            }
            if TcpStream::connect(self.metrics).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("ambit ca did not listen within 20 s:\n{}", self.log())
    }

    /// Waits for the process to exit, failing if it does within 20 s.
    pub(crate) async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("ambit ca still runs after 20 s:\n{}", self.log())
    }

    /// A client of the CA that trusts `root` only and expects the name `localhost`.
    pub(crate) async fn client(
        &self,
        root: &CertificateDer<'static>,
    ) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
        let mut roots = RootCertStore::empty();
        roots.add(root.clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnect {
            addr: self.listen,
            tls: TlsConnector::from(Arc::new(config)),
        };
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(connector)
            .await?;
        Ok(IstioCertificateServiceClient::new(channel))
    }

    /// `/metrics` of the CA.
    pub(crate) async fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// How many requests ended with `code` and `reason`.
    pub(crate) async fn count(&self, code: &str, reason: &str) -> anyhow::Result<u64> {
        let series = format!("ambit_ca_requests_total{{code=\"{code}\",reason=\"{reason}\"}} ");
        self.metric(&series).await
    }

    /// The value of the series whose line starts with `series` (name, labels and a space); 0
    /// when absent.
    pub(crate) async fn metric(&self, series: &str) -> anyhow::Result<u64> {
        let metrics = self.scrape().await?;
        Ok(metrics
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .map_or(Ok(0), str::parse)?)
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The usual setup: the fake API server, a CA directory laid out as a mounted Secret holding a
/// CA, and `ambit ca` signing with it.
pub(crate) struct Harness {
    pub(crate) api: ApiServer,
    pub(crate) ca_dir: SecretDir,
    pub(crate) ca: CaProcess,
}

impl Harness {
    pub(crate) async fn start(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start_with(ca, "", &[]).await
    }

    /// With `more_objects` in the API server and `flags` for `ambit ca`.
    pub(crate) async fn start_with(
        ca: &TestCa,
        more_objects: &str,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let api = ApiServer::start(more_objects).await?;
        fs::create_dir(api.path("cacerts"))?;
        let mut ca_dir = SecretDir {
            path: api.path("cacerts"),
            versions: 0,
        };
        ca_dir.write(&ca.files)?;
        let ca = CaProcess::start(&api, "ca", &ca_dir.path, flags).await?;
        Ok(Self { api, ca_dir, ca })
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A loopback address with a port free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The test client's transport: TCP to the CA, then TLS for the name `localhost`.
#[derive(Clone)]
struct TlsConnect {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, tls) = (self.addr, self.tls.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let stream = tls
                .connect(
                    ServerName::try_from("localhost").map_err(std::io::Error::other)?,
                    tcp,
                )
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A certificate request, its CSR over a new key.
pub(crate) struct Ask {
    pub(crate) token: Option<&'static str>,
    pub(crate) impersonate: Option<&'static str>,
    /// The CSR's one URI SAN.
    pub(crate) csr_identity: &'static str,
    pub(crate) validity_seconds: i64,
}

impl Ask {
    /// `token` asking for `identity` on behalf of a workload, with a CSR for it.
    pub(crate) fn impersonating(token: &'static str, identity: &'static str) -> Self {
        Self {
            token: Some(token),
            impersonate: Some(identity),
            csr_identity: identity,
            validity_seconds: 0,
        }
    }

    pub(crate) async fn send(
        self,
        client: &mut IstioCertificateServiceClient<Channel>,
    ) -> anyhow::Result<Result<IstioCertificateResponse, Status>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(self.csr_identity.try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let metadata = self.impersonate.map(|identity| prost_types::Struct {
            fields: [(
                ambit_ca::IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.validity_seconds,
            metadata,
        });
        if let Some(token) = self.token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let answer =
            tokio::time::timeout(Duration::from_secs(15), client.create_certificate(request))
                .await
                .context("the CA did not answer within 15 s")?;
        Ok(answer.map(tonic::Response::into_inner))
    }

    /// Sends the request and returns the refusal's code, failing if a certificate came back.
    pub(crate) async fn refused(
        self,
        client: &mut IstioCertificateServiceClient<Channel>,
    ) -> anyhow::Result<Code> {
        match self.send(client).await? {
            Ok(_) => bail!("a certificate was issued"),
            Err(status) => Ok(status.code()),
        }
    }
}

/// Checks an issued chain: the leaf's only SAN is `identity`, it chains through the middle
/// elements to the roots of the last element, which are `roots`, and it lives `ttl`.
pub(crate) fn check_issued(
    response: &IstioCertificateResponse,
    identity: &str,
    roots: &[CertificateDer<'static>],
    ttl: Duration,
) -> anyhow::Result<()> {
    let parse = |pem: &String| {
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()
    };
    let [leaf, middle @ .., last] = response.cert_chain.as_slice() else {
        bail!("a chain of {} elements", response.cert_chain.len());
    };
    let leaf = parse(leaf)?.pop().context("an empty leaf element")?;
    let intermediates = middle
        .iter()
        .map(|pem| {
            let certificates = parse(pem)?;
            ensure!(
                certificates.len() == 1,
                "a middle element holds {} certificates",
                certificates.len()
            );
            certificates
                .into_iter()
                .next()
                .context("an empty middle element")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(
        parse(last)? == roots,
        "the last element is not the CA's roots"
    );

    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)?;
    let sans: Vec<String> = parsed
        .subject_alternative_name()?
        .context("no SAN")?
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => (*uri).to_owned(),
            other => format!("{other}"),
        })
        .collect();
    ensure!(sans == [identity], "the leaf's SANs are {sans:?}");

    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .build()?
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .context("the leaf does not chain to the roots")?;

    let not_after = ambit_identity::certificate_not_after(&leaf)?;
    let lives = not_after.duration_since(SystemTime::now())?;
    ensure!(
        lives <= ttl && lives + Duration::from_secs(30) >= ttl,
        "the leaf lives {lives:?} more, not {ttl:?}"
    );
    Ok(())
}
