//! Fixtures for ambit's tests and benchmarks: a throwaway PKI built at test time
//! ([`TestPki`]), plain TCP peers ([`EchoServer`]), a writer to read a logger's output back
//! ([`SharedBuffer`]), and the measurements the benchmarks share ([`measure`]). Nothing here is checked in as a blob: every key and certificate is generated
//! when a test runs.

#![expect(
    clippy::expect_used,
    reason = "a fixture that cannot be built fails the test that asked for it"
)]

pub mod measure;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_identity::{CertificateManager, Identity, LocalCa, TrustDomain, WorkloadCertificate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A local CA in a temporary directory, for one trust domain.
#[derive(Debug)]
pub struct TestPki {
    trust_domain: TrustDomain,
    ca: Arc<LocalCa>,
    _dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        Self::with_ttl(trust_domain, ambit_identity::DEFAULT_WORKLOAD_TTL)
    }

    pub fn with_ttl(trust_domain: &str, ttl: Duration) -> Self {
        let trust_domain: TrustDomain = trust_domain.parse().expect("valid trust domain");
        let dir = tempfile::tempdir().expect("temporary CA directory");
        let ca = LocalCa::load_or_create(dir.path(), &trust_domain)
            .expect("self-signed test CA")
            .with_workload_ttl(ttl);
        Self {
            trust_domain,
            ca: Arc::new(ca),
            _dir: dir,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub fn identity(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(&self.trust_domain, namespace, service_account).expect("valid identity")
    }

    /// A certificate for `identity`, signed now.
    pub fn certificate(&self, identity: &Identity) -> Arc<WorkloadCertificate> {
        Arc::new(self.ca.sign(identity).expect("test CA signs"))
    }

    /// A certificate manager backed by this CA.
    pub fn manager(&self) -> Arc<CertificateManager> {
        Arc::new(CertificateManager::new(self.ca.clone()))
    }
}

/// A TCP server on loopback that echoes every byte back until the client closes.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo server");
        let addr = listener.local_addr().expect("echo server address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(echo(stream));
            }
        });
        Self { addr, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// An address on loopback where nothing listens.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind probe");
    listener.local_addr().expect("probe address")
}

/// A writer whose clones all append to one buffer: what a logger under test wrote, read back
/// with [`SharedBuffer::text`].
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// What was written so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
