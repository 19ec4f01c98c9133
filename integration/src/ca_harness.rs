//! `ambit ca` as a child process against `fake-apiserver`, another child process, for the
//! tests and the benchmark of the CA: [`TestCa`] generates a CA in Istio's `cacerts` layout,
//! [`CaHarness`] writes it as the kubelet mounts a Secret, starts both processes on loopback
//! and hands out the agent's client of the CA. Needs no root.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_ca::client::{CaClient, CaClientConfig};
use anyhow::{Context, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{agent_binary, fake_apiserver_binary};

/// How long either process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

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

/// A directory laid out as the kubelet mounts a Secret: each file a symlink through `..data`,
/// a symlink to the current version, swapped to change every file at once.
#[derive(Debug)]
struct SecretDir {
    path: PathBuf,
    versions: u32,
}

impl SecretDir {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, versions: 0 })
    }

    fn write(&mut self, files: &[(&'static str, String)]) -> anyhow::Result<()> {
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

/// `fake-apiserver` serving a cluster, and `ambit ca` reviewing tokens and looking up pods
/// with it, both on loopback and killed when dropped.
///
/// The CA trusts the node agents' account `ambit-system/ambit`, answers to `localhost` and
/// `127.0.0.1`, and issues for [`CaHarness::DEFAULT_TTL`] up to [`CaHarness::MAX_TTL`].
#[derive(Debug)]
pub struct CaHarness {
    // Fields drop in order: the processes end before their directory goes.
    server: ChildProcess,
    apiserver: ChildProcess,
    listen: SocketAddr,
    metrics: SocketAddr,
    ca_dir: SecretDir,
    dir: tempfile::TempDir,
}

impl CaHarness {
    /// The lifetime of a certificate whose request names none.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
    /// The longest lifetime the CA grants.
    pub const MAX_TTL: Duration = Duration::from_secs(2 * 3600);

    /// Starts the API server with `objects` (multi-document YAML) and the known `tokens`
    /// (`fake-apiserver --tokens`), then `ambit ca` signing with `ca`; returns once both listen.
    pub async fn start(objects: &str, tokens: &str, ca: &TestCa) -> anyhow::Result<Self> {
        let (ambit, fake) = (agent_binary(), fake_apiserver_binary());
        for (binary, build) in [(&ambit, "-p ambit-agent"), (&fake, "-p ambit-integration")] {
            ensure!(
                binary.exists(),
                "{} is missing: build it first (cargo build {build}) or name it with \
                 AMBIT_BIN or AMBIT_FAKE_APISERVER_BIN",
                binary.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let path = |name: &str| dir.path().join(name);
        fs::write(path("objects.yaml"), objects)?;
        fs::write(path("tokens.yaml"), tokens)?;
        let mut apiserver = Command::new(&fake)
            .arg("--objects")
            .arg(path("objects.yaml"))
            .arg("--tokens")
            .arg(path("tokens.yaml"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--kubeconfig-out")
            .arg(path("kubeconfig"))
            .stdout(Stdio::null())
            .stderr(File::create(path("apiserver.log"))?)
            .spawn()
            .map(ChildProcess)
            .with_context(|| format!("starting {}", fake.display()))?;
        wait_for_kubeconfig(&mut apiserver, &path("kubeconfig"), &path("apiserver.log")).await?;

        let mut ca_dir = SecretDir::create(path("cacerts"))?;
        ca_dir.write(&ca.files)?;
        let (listen, metrics) = (free_port()?, free_port()?);
        let server = Command::new(&ambit)
            .arg("ca")
            .args(["--listen", &listen.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--ca-dir")
            .arg(&ca_dir.path)
            .arg("--kubeconfig")
            .arg(path("kubeconfig"))
            .args(["--server-names", "localhost,127.0.0.1"])
            .args(["--default-ttl", "1h", "--max-ttl", "2h"])
            .stdout(Stdio::null())
            .stderr(File::create(path("ca.log"))?)
            .spawn()
            .map(ChildProcess)
            .context("starting ambit ca")?;
        let mut harness = Self {
            server,
            apiserver,
            listen,
            metrics,
            ca_dir,
            dir,
        };
        harness.wait_listening().await?;
        Ok(harness)
    }

    /// Where the certificate service listens (TLS for `localhost` and `127.0.0.1`).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The CA directory, as `ambit ca` and the local CA read it.
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir.path
    }

    /// Replaces the files of the CA directory at once, as an update of the Secret does.
    pub fn replace_ca(&mut self, ca: &TestCa) -> anyhow::Result<()> {
        self.ca_dir.write(&ca.files)
    }

    /// The process ids of `ambit ca` and of the API server.
    pub fn pids(&self) -> (u32, u32) {
        (self.server.0.id(), self.apiserver.0.id())
    }

    /// What `ambit ca` logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("ca.log")).unwrap_or_default()
    }

    /// The agent's client of this CA: it sends `token` (a token of the tokens file) and
    /// trusts the root of `ca`, asking for `ttl`.
    pub fn agent_client(
        &self,
        token: &str,
        ca: &TestCa,
        ttl: Duration,
    ) -> anyhow::Result<CaClient> {
        let files = self.dir.path();
        let token_file = files.join(format!("token-{token}"));
        fs::write(&token_file, format!("{token}\n"))?;
        let root_file = files.join(format!("root-{token}.pem"));
        fs::write(&root_file, ca.root_pem())?;
        Ok(CaClient::new(CaClientConfig {
            address: format!("https://{}", self.listen).parse()?,
            root_file,
            server_name: Some("localhost".to_owned()),
            token_file,
            cluster_id: ambit_ca::DEFAULT_CLUSTER_ID.to_owned(),
            ttl,
        }))
    }

    /// `/metrics` of the CA.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// How many requests ended with the gRPC `code` (`OK`, `PermissionDenied`) and `reason`.
    pub async fn count(&self, code: &str, reason: &str) -> anyhow::Result<u64> {
        let series = format!("ambit_ca_requests_total{{code=\"{code}\",reason=\"{reason}\"}} ");
        let metrics = self.scrape().await?;
        Ok(metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(Ok(0), str::parse)?)
    }

    /// Waits until `ambit ca` serves its metrics, which it binds with its service.
    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.server.0.try_wait()? {
                bail!("ambit ca exited with {status}:\n{}", self.log());
            }
            if TcpStream::connect(self.metrics).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "ambit ca did not listen within {} s:\n{}",
            START_TIMEOUT.as_secs(),
            self.log()
        )
    }
}

/// A child process, killed when dropped.
#[derive(Debug)]
struct ChildProcess(Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API server writes its kubeconfig once it listens.
async fn wait_for_kubeconfig(
    apiserver: &mut ChildProcess,
    kubeconfig: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !kubeconfig.exists() {
        let log = || fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = apiserver.0.try_wait()? {
            bail!("fake-apiserver exited with {status}:\n{}", log());
        }
        if Instant::now() > deadline {
            bail!("fake-apiserver wrote no kubeconfig:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A loopback address with a port free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
