//! `ambit ca` as a process against the fake API server (`ambit_integration::CaHarness`): which
//! caller gets which certificate, with which gRPC code it is refused otherwise, the counts on
//! its metrics port, a new root in its CA directory taken up without a restart, and the agent's
//! client (`ambit_ca::client`) reading its answers. Needs no root.
//!
//! The cluster: node agents `ambit-node1` and `ambit-node2` (`ambit-system/ambit`), the
//! workload `web` (`shop/web`) on node1 and `db` (`shop/db`) on node2.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use ambit_ca::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_ca::proto::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_integration::{CaHarness, TestCa};
use anyhow::{Context as _, bail, ensure};
use hyper_util::rt::TokioIo;
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

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
/// The namespace of a static pod of node1: a node can declare one anywhere, so it makes no
/// identity of that namespace the node's.
const PAYMENTS_DEFAULT: &str = "spiffe://cluster.local/ns/payments/sa/default";
const DEFAULT_TTL: Duration = CaHarness::DEFAULT_TTL;
const MAX_TTL: Duration = CaHarness::MAX_TTL;

/// A client of the CA that trusts `root` only and expects the name `localhost`.
async fn grpc_client(
    harness: &CaHarness,
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
        addr: harness.listen(),
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
struct Ask {
    token: Option<&'static str>,
    impersonate: Option<&'static str>,
    /// The CSR's one URI SAN.
    csr_identity: &'static str,
    validity_seconds: i64,
}

impl Ask {
    /// `token` asking for `identity` on behalf of a workload, with a CSR for it.
    fn impersonating(token: &'static str, identity: &'static str) -> Self {
        Self {
            token: Some(token),
            impersonate: Some(identity),
            csr_identity: identity,
            validity_seconds: 0,
        }
    }

    async fn send(
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
    async fn refused(
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
fn check_issued(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_gets_the_identity_of_a_pod_on_its_node() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = CaHarness::start(OBJECTS, TOKENS, &ca).await?;
    let mut client = grpc_client(&harness, ca.root()).await?;
    let roots = [ca.root().clone()];

    let response = Ask::impersonating("node1", WEB).send(&mut client).await??;
    ensure!(response.cert_chain.len() == 3, "leaf, intermediate, root");
    check_issued(&response, WEB, &roots, DEFAULT_TTL)?;

    let long = Ask {
        validity_seconds: 3 * 3600,
        ..Ask::impersonating("node1", WEB)
    };
    let response = long.send(&mut client).await??;
    check_issued(&response, WEB, &roots, MAX_TTL)?;

    let short = Ask {
        validity_seconds: 600,
        ..Ask::impersonating("node1", WEB)
    };
    let response = short.send(&mut client).await??;
    check_issued(&response, WEB, &roots, Duration::from_secs(600))?;

    ensure!(
        harness.count("OK", "issued").await? == 3,
        "{}",
        harness.scrape().await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_for_node_agents_and_the_pods_on_their_node() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = CaHarness::start(OBJECTS, TOKENS, &ca).await?;
    let mut client = grpc_client(&harness, ca.root()).await?;

    let elsewhere = Ask::impersonating("node1", DB).refused(&mut client).await?;
    ensure!(
        elsewhere == Code::PermissionDenied,
        "node1 asking for db: {elsewhere:?}"
    );

    let not_a_node = Ask::impersonating("db", WEB).refused(&mut client).await?;
    ensure!(
        not_a_node == Code::PermissionDenied,
        "db asking for web: {not_a_node:?}"
    );

    let own = Ask {
        token: Some("web"),
        impersonate: None,
        csr_identity: WEB,
        validity_seconds: 0,
    };
    let response = own.send(&mut client).await??;
    check_issued(&response, WEB, std::slice::from_ref(ca.root()), DEFAULT_TTL)?;
    let workload = Ask::impersonating("web", DB).refused(&mut client).await?;
    ensure!(
        workload == Code::PermissionDenied,
        "web asking for db: {workload:?}"
    );

    let declared_by_the_node = Ask::impersonating("node1", PAYMENTS_DEFAULT)
        .refused(&mut client)
        .await?;
    ensure!(
        declared_by_the_node == Code::PermissionDenied,
        "node1 asking for the account of its static pod: {declared_by_the_node:?}"
    );

    let stale = Ask::impersonating("node1-of-a-deleted-pod", WEB)
        .refused(&mut client)
        .await?;
    ensure!(
        stale == Code::PermissionDenied,
        "a token of another pod uid: {stale:?}"
    );

    for (reason, expected) in [
        ("no_pod_on_node", 2),
        ("not_a_node_account", 2),
        ("caller_pod_mismatch", 1),
    ] {
        let counted = harness.count("PermissionDenied", reason).await?;
        ensure!(
            counted == expected,
            "{reason}: {counted}\n{}",
            harness.scrape().await?
        );
    }
    ensure!(harness.count("OK", "issued").await? == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_do_not_authenticate_are_refused() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = CaHarness::start(OBJECTS, TOKENS, &ca).await?;
    let mut client = grpc_client(&harness, ca.root()).await?;

    for (token, reason) in [
        (Some("node1-expired"), "token_rejected"),
        (Some("node1-for-the-api-server"), "token_rejected"),
        (Some("unknown"), "token_rejected"),
        (None, "missing_token"),
    ] {
        let ask = Ask {
            token,
            ..Ask::impersonating("node1", WEB)
        };
        let code = ask.refused(&mut client).await?;
        ensure!(code == Code::Unauthenticated, "{token:?}: {code:?}");
        ensure!(
            harness.count("Unauthenticated", reason).await? >= 1,
            "{token:?} not counted as {reason}"
        );
    }
    ensure!(harness.count("Unauthenticated", "token_rejected").await? == 3);
    ensure!(
        harness.log().contains("token has expired"),
        "{}",
        harness.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_something_else_are_invalid() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = CaHarness::start(OBJECTS, TOKENS, &ca).await?;
    let mut client = grpc_client(&harness, ca.root()).await?;

    let other_san = Ask {
        csr_identity: DB,
        ..Ask::impersonating("node1", WEB)
    };
    let code = other_san.refused(&mut client).await?;
    ensure!(code == Code::InvalidArgument, "a CSR for db: {code:?}");

    let foreign = Ask::impersonating("node1", "spiffe://other.example/ns/shop/sa/web")
        .refused(&mut client)
        .await?;
    ensure!(
        foreign == Code::InvalidArgument,
        "another trust domain: {foreign:?}"
    );

    ensure!(
        harness
            .count("InvalidArgument", "csr_identity_mismatch")
            .await?
            == 1
    );
    ensure!(
        harness
            .count("InvalidArgument", "foreign_trust_domain")
            .await?
            == 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_in_the_ca_directory_is_signed_with_and_served() -> anyhow::Result<()> {
    let first = TestCa::with_intermediate("first")?;
    let mut harness = CaHarness::start(OBJECTS, TOKENS, &first).await?;
    let second = TestCa::root_only("second")?;
    harness.replace_ca(&second)?;

    // The directory is polled every 5 s; the server presents a certificate of the new CA once
    // it reloaded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match grpc_client(&harness, second.root()).await {
            Ok(client) => break client,
            Err(error) if Instant::now() > deadline => {
                bail!(
                    "no certificate of the new root served: {error:#}\n{}",
                    harness.log()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let response = Ask::impersonating("node1", WEB).send(&mut client).await??;
    ensure!(response.cert_chain.len() == 2, "leaf and root");
    check_issued(
        &response,
        WEB,
        std::slice::from_ref(second.root()),
        DEFAULT_TTL,
    )?;
    ensure!(
        grpc_client(&harness, first.root()).await.is_err(),
        "the server still presents a certificate of the old root"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_client_gets_workload_certificates() -> anyhow::Result<()> {
    use ambit_identity::CertificateProvider;

    let ca = TestCa::with_intermediate("cluster")?;
    let harness = CaHarness::start(OBJECTS, TOKENS, &ca).await?;
    let client = harness.agent_client("node1", &ca, Duration::from_secs(1800))?;

    let web: ambit_identity::Identity = WEB.parse()?;
    let certificate = client.issue(&web).await?;
    ensure!(certificate.identity() == &web);
    let lifetime = certificate.lifetime();
    ensure!(
        lifetime >= Duration::from_secs(1800) && lifetime <= Duration::from_secs(1800 + 120),
        "lives {lifetime:?}"
    );
    ensure!(
        certificate.certified_key().cert.len() == 2,
        "the leaf and the intermediate"
    );

    let db: ambit_identity::Identity = DB.parse()?;
    ensure!(
        client.issue(&db).await.is_err(),
        "a certificate for a pod on another node"
    );
    Ok(())
}
