//! `CreateCertificate`: authenticate the caller, find the identity it asks for, authorize it,
//! sign; every outcome logged and counted.

use std::sync::Arc;
use std::time::Duration;

use ambit_identity::{Identity, TrustDomain};
use tonic::{Code, Request, Response, Status};

use super::authenticate::Authenticator;
use super::authority::Authority;
use super::authorize::{Authorizer, Grant};
use super::connection::ClientAddr;
use super::metrics::Metrics;
use super::refusal::Refusal;
use super::request::{TtlPolicy, requested_identity};
use super::service_account::ServiceAccount;
use super::signer::{Issued, sign};
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};

/// How long a request may take, API calls included: the agent gives up after 10 s, and a
/// certificate issued after that would reach no one.
const REQUEST_DEADLINE: Duration = Duration::from_secs(8);

/// The certificate service.
pub(crate) struct CertificateService {
    pub(crate) authority: Arc<Authority>,
    pub(crate) authenticator: Authenticator,
    pub(crate) authorizer: Authorizer,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) ttl: TtlPolicy,
    pub(crate) metrics: Metrics,
}

/// What is known of a request so far, for its log line.
#[derive(Debug, Default)]
struct Attempt {
    caller: Option<ServiceAccount>,
    identity: Option<Identity>,
}

/// A certificate issued, and why it was allowed.
struct Granted {
    issued: Issued,
    grant: Grant,
    ttl: Duration,
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let client = request.extensions().get::<ClientAddr>().map(|addr| addr.0);
        let mut attempt = Attempt::default();
        let outcome = tokio::time::timeout(REQUEST_DEADLINE, self.issue(request, &mut attempt))
            .await
            .unwrap_or_else(|_| Err(Refusal::deadline(REQUEST_DEADLINE)));
        let src_addr = client.map(tracing::field::display);
        let caller = attempt.caller.as_ref().map(tracing::field::display);
        let identity = attempt.identity.as_ref().map(tracing::field::display);
        match outcome {
            Ok(Granted { issued, grant, ttl }) => {
                self.metrics.count(Code::Ok, "issued");
                let node = match &grant {
                    Grant::Own => None,
                    Grant::OnNode(node) => Some(node.as_str()),
                };
                tracing::info!(
                    src.addr = src_addr,
                    caller,
                    identity,
                    node,
                    serial = %issued.serial,
                    ttl_seconds = ttl.as_secs(),
                    "issued a certificate"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.cert_chain,
                }))
            }
            Err(refusal) => {
                self.metrics.count(refusal.code, refusal.reason);
                tracing::warn!(
                    src.addr = src_addr,
                    caller,
                    identity,
                    code = ?refusal.code,
                    reason = refusal.reason,
                    error = %refusal.message,
                    "refused a certificate request"
                );
                Err(refusal.status())
            }
        }
    }
}

impl CertificateService {
    async fn issue(
        &self,
        request: Request<IstioCertificateRequest>,
        attempt: &mut Attempt,
    ) -> Result<Granted, Refusal> {
        let caller = self.authenticator.authenticate(request.metadata()).await?;
        attempt.caller = Some(caller.account.clone());
        let request = request.into_inner();
        let identity = requested_identity(
            request.metadata.as_ref(),
            &caller.account,
            &self.trust_domain,
        )?;
        attempt.identity = Some(identity.clone());
        let grant = self.authorizer.authorize(&caller, &identity).await?;
        let ttl = self.ttl.lifetime(request.validity_duration);
        let issued = sign(&self.authority.current().ca, &request.csr, &identity, ttl)?;
        Ok(Granted { issued, grant, ttl })
    }
}
