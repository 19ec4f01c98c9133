//! What the tests of `ambit ca` run it with, besides `ambit_integration`'s processes: the fake
//! API server's cluster, a raw gRPC client of the CA, and certificate requests with the checks
//! of their answers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use ambit_ca::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_ca::proto::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_integration::{ApiServerProcess, CaHarness, CaProcess, TestCa};
use anyhow::{Context as _, bail, ensure};
use hyper_util::rt::TokioIo;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
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

/// The fake API server serving [`OBJECTS`] followed by `more_objects` (YAML documents), and
/// reviewing [`TOKENS`].
pub(crate) async fn api_server(more_objects: &str) -> anyhow::Result<ApiServerProcess> {
    ApiServerProcess::start(&format!("{OBJECTS}{more_objects}"), TOKENS).await
}

/// The usual setup: [`api_server`], and `ambit ca` signing with `ca`.
pub(crate) async fn start_ca(ca: &TestCa) -> anyhow::Result<CaHarness> {
    start_ca_with(ca, "", &[]).await
}

/// With `more_objects` in the API server and `flags` for `ambit ca`.
pub(crate) async fn start_ca_with(
    ca: &TestCa,
    more_objects: &str,
    flags: &[&str],
) -> anyhow::Result<CaHarness> {
    CaHarness::start(api_server(more_objects).await?, ca, flags).await
}

/// A client of the API server, as the test itself.
pub(crate) async fn kube_client(api: &ApiServerProcess) -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(api.kubeconfig())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A raw gRPC client of `ca` that trusts `root` only and expects the name `localhost`.
pub(crate) async fn grpc_client(
    ca: &CaProcess,
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
        addr: ca.listen(),
        tls: TlsConnector::from(Arc::new(config)),
    };
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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
