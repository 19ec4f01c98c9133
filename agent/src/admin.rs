//! The agent's HTTP surfaces besides readiness: Prometheus metrics (:15020) and the admin API
//! (127.0.0.1:15000) that `ambit debug` reads. The admin API answers loopback clients only,
//! whatever address it is bound to: it shows the node's identities and changes the log level.

pub(crate) mod check;
pub(crate) mod query;
pub mod views;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use ambit_identity::{CertificateManager, TrustDomain};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::balance::Balancer;
use crate::dns::NodeDns;
use crate::egress::OutboundTrafficPolicy;
use crate::enrolment::{Capture, CaptureStatus, FoundBy};
use crate::handover::HandoverStatus;
use crate::http_server::{Body, Handler, json, respond, text};
use crate::logging::LogLevel;
use crate::policy::{Action, MtlsMode, Scope};
use crate::state::{ClusterState, Protocol, Service, TargetPort};
use crate::telemetry::{Telemetry, unix_seconds};
use views::{
    CertificateView, ConfigDump, EffectiveConfig, EndpointView, ErrorView, LoggingView,
    PoliciesView, PolicyView, ServiceView, WorkloadView,
};

/// The content type of the OpenMetrics text that prometheus-client writes.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics` and `/stats/prometheus`.
#[derive(Debug)]
pub(crate) struct MetricsEndpoint {
    telemetry: Arc<Telemetry>,
    /// Held while a scrape is encoded: scrapes that arrive meanwhile wait their turn.
    encoding: tokio::sync::Mutex<()>,
}

impl MetricsEndpoint {
    pub(crate) fn new(telemetry: Arc<Telemetry>) -> Self {
        Self {
            telemetry,
            encoding: tokio::sync::Mutex::new(()),
        }
    }

    /// The exposition text, encoded on a blocking thread, one scrape at a time. On a busy node
    /// encoding takes milliseconds (thousands of series, and the capture programs' counters,
    /// read under the locks that enrolment holds while it works): on an async worker, the
    /// connections it carries would wait that long. `None` when the runtime is stopping.
    async fn encode(&self) -> Option<String> {
        let _turn = self.encoding.lock().await;
        let telemetry = self.telemetry.clone();
        match tokio::task::spawn_blocking(move || telemetry.metrics.encode()).await {
            Ok(text) => Some(text),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => None,
        }
    }
}

impl Handler for MetricsEndpoint {
    async fn handle(&self, request: Request<Incoming>, _: SocketAddr) -> Response<Body> {
        match request.uri().path() {
            "/metrics" | "/stats/prometheus" => match self.encode().await {
                Some(text) => respond(StatusCode::OK, OPENMETRICS, Bytes::from(text)),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n"),
            },
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
        }
    }
}

/// The admin API.
#[derive(Debug)]
pub(crate) struct AdminApi {
    pub(crate) config: EffectiveConfig,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) states: watch::Receiver<Arc<ClusterState>>,
    pub(crate) capture: watch::Receiver<CaptureStatus>,
    pub(crate) certificates: Arc<CertificateManager>,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) log_level: LogLevel,
    pub(crate) egress: EgressContext,
    /// This agent, and the one it replaced.
    pub(crate) handover: Arc<HandoverStatus>,
}

/// What egress decisions are made with: the default outbound traffic policy, and what each pod
/// was answered over DNS.
#[derive(Debug)]
pub(crate) struct EgressContext {
    pub(crate) default: OutboundTrafficPolicy,
    pub(crate) dns: Arc<NodeDns>,
}

impl Handler for AdminApi {
    async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        if !client.ip().is_loopback() {
            tracing::warn!(%client, "refused an admin request from a non-loopback client");
            return error(
                StatusCode::FORBIDDEN,
                "the admin API answers loopback clients only",
            );
        }
        let query = request.uri().query().unwrap_or_default();
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/config_dump") => json(&self.config_dump()),
            (&Method::GET, "/logging") => json(&LoggingView {
                level: self.log_level.get(),
            }),
            (&Method::POST, "/logging") => self.set_log_level(query),
            (&Method::GET, "/debug/agent") => json(&self.handover.view()),
            (&Method::GET, "/debug/workloads") => json(&self.workloads()),
            (&Method::GET, "/debug/services") => {
                json(&services(&self.states.borrow(), &self.balancer))
            }
            (&Method::GET, "/debug/policies") => json(&policies(&self.states.borrow())),
            (&Method::GET, "/debug/certs") => json(&self.certificates()),
            (&Method::GET, "/debug/connections") => json(&self.telemetry.connections.snapshot()),
            (&Method::GET, "/debug/edges") => json(&self.telemetry.baseline.edges()),
            (&Method::GET, "/debug/dns") => self.dns(query),
            (&Method::GET, "/debug/check") => {
                let state = self.states.borrow().clone();
                match check::run(&state, &self.trust_domain, &self.egress, query) {
                    Ok(view) => json(&view),
                    Err(failure) => error(StatusCode::BAD_REQUEST, &failure.to_string()),
                }
            }
            (_, path) => error(StatusCode::NOT_FOUND, &format!("no admin endpoint {path}")),
        }
    }
}

impl AdminApi {
    /// The latest DNS answers of the pod `pod` (`namespace/name`, a name, or an IP) names.
    fn dns(&self, query: &str) -> Response<Body> {
        let state = self.states.borrow().clone();
        let Some(pod) = query::value(query, "pod") else {
            return error(StatusCode::BAD_REQUEST, "missing the `pod` parameter");
        };
        let workload = match pod.parse::<IpAddr>() {
            Ok(ip) => state
                .workload_by_ip(ip)
                .cloned()
                .ok_or(check::CheckError::UnknownIp(ip)),
            Err(_) => check::pod(&state, &pod),
        };
        let workload = match workload {
            Ok(workload) => workload,
            Err(failure) => return error(StatusCode::BAD_REQUEST, &failure.to_string()),
        };
        match self.egress.dns.view(&workload) {
            Some(view) => json(&view),
            None => error(
                StatusCode::NOT_FOUND,
                &format!(
                    "{} is not served by this node's DNS proxy (not enrolled on this node?)",
                    workload.qualified_name()
                ),
            ),
        }
    }

    fn config_dump(&self) -> ConfigDump {
        let state = self.states.borrow().clone();
        ConfigDump {
            config: self.config.clone(),
            workloads: self.workloads(),
            services: services(&state, &self.balancer),
            policies: policies(&state),
            certificates: self.certificates(),
        }
    }

    fn set_log_level(&self, query: &str) -> Response<Body> {
        let Some(level) = query::value(query, "level") else {
            return error(StatusCode::BAD_REQUEST, "missing ?level=FILTER");
        };
        match self.log_level.set(&level) {
            Ok(()) => {
                tracing::info!(level, "log level changed");
                json(&LoggingView {
                    level: self.log_level.get(),
                })
            }
            Err(failure) => error(StatusCode::BAD_REQUEST, &failure.to_string()),
        }
    }

    fn workloads(&self) -> Vec<WorkloadView> {
        let state = self.states.borrow().clone();
        let capture = self.capture.borrow().clone();
        state
            .workloads()
            .into_iter()
            .map(|w| WorkloadView {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                workload: w.workload_name.clone(),
                identity: (w.protocol == Protocol::Hbone)
                    .then(|| w.identity(&self.trust_domain).ok())
                    .flatten()
                    .map(|id| id.to_string()),
                node: w.node.clone(),
                ips: w.ips.clone(),
                protocol: match w.protocol {
                    Protocol::Hbone => "HBONE",
                    Protocol::Tcp => "TCP",
                }
                .to_owned(),
                labels: w.labels.clone(),
                capture: capture.get(&w.uid).map(|c| match c {
                    Capture::Captured(FoundBy::Search) => "captured".to_owned(),
                    Capture::Captured(FoundBy::Plugin) => "captured (cni)".to_owned(),
                    Capture::Pending(why) => format!("pending: {why}"),
                    Capture::Failed(why) => format!("failed: {why}"),
                    Capture::Refused(why) => format!("refused: {why}"),
                }),
                waypoint: w.waypoint.as_ref().map(ToString::to_string),
            })
            .collect()
    }

    fn certificates(&self) -> Vec<CertificateView> {
        let now = SystemTime::now();
        self.certificates
            .status()
            .into_iter()
            .map(|status| {
                let certificate = status.certificate.as_ref();
                CertificateView {
                    identity: status.identity.to_string(),
                    serial: certificate.map(|c| c.serial().to_owned()),
                    not_before: certificate.map(|c| unix_seconds(c.not_before())),
                    not_after: certificate.map(|c| unix_seconds(c.not_after())),
                    seconds_left: certificate.map(|c| {
                        c.not_after()
                            .duration_since(now)
                            .map_or(0, |left| left.as_secs())
                    }),
                    error: status.error.map(|e| e.to_string()),
                }
            })
            .collect()
    }
}

/// The Services, and how long each endpoint stays ejected, if it is.
fn services(state: &ClusterState, balancer: &Balancer) -> Vec<ServiceView> {
    let ejected = balancer.ejected();
    let ejected_for = |ip: IpAddr| {
        ejected
            .iter()
            .filter(|(endpoint, _)| endpoint.ip() == ip)
            .map(|(_, left)| left.as_secs().max(1))
            .max()
    };
    state
        .services()
        .into_iter()
        .map(|s| service(s, ejected_for))
        .collect()
}

fn service(s: &Service, ejected_for: impl Fn(IpAddr) -> Option<u64>) -> ServiceView {
    ServiceView {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        hostname: s.hostname.clone(),
        vips: s.vips.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| match &p.target {
                TargetPort::Number(n) => format!("{} -> {n}", p.port),
                TargetPort::Named(name) => format!("{} -> {name}", p.port),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| EndpointView {
                ip: e.ip,
                ready: e.ready,
                ejected_for_s: ejected_for(e.ip),
            })
            .collect(),
        waypoint: s.waypoint.as_ref().map(ToString::to_string),
    }
}

fn policies(state: &ClusterState) -> PoliciesView {
    let authorization = state.authorization().iter().map(|p| PolicyView {
        kind: "AuthorizationPolicy".to_owned(),
        name: p.name.to_string(),
        scope: scope(
            &p.scope,
            &p.name.namespace,
            state.authorization().root_namespace(),
        ),
        action: action_name(p.action).to_owned(),
        dry_run: p.dry_run,
        rules: p.rules.len(),
    });
    let root = state.peer_authentication().root_namespace();
    let peer_authentication = state.peer_authentication().iter().map(|p| PolicyView {
        kind: "PeerAuthentication".to_owned(),
        name: p.name.to_string(),
        scope: scope(&p.scope, &p.name.namespace, root),
        action: mode_name(p.mode).to_owned(),
        dry_run: false,
        rules: p.ports.len(),
    });
    PoliciesView {
        policies: authorization.chain(peer_authentication).collect(),
        rejected: state.rejected_policies().to_vec(),
    }
}

fn scope(scope: &Scope, namespace: &str, root_namespace: &str) -> String {
    match scope {
        Scope::Namespace if namespace == root_namespace => "mesh".to_owned(),
        Scope::Namespace => "namespace".to_owned(),
        Scope::Selector(labels) => {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("selector {}", labels.join(","))
        }
        Scope::Services(names) => format!("services {}", names.join(",")),
        Scope::Gateways(names) => format!("waypoints {}", names.join(",")),
        Scope::Waypoint(waypoint) => format!("behind waypoint {waypoint}"),
    }
}

pub(crate) fn action_name(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
    }
}

pub(crate) fn mode_name(mode: MtlsMode) -> &'static str {
    match mode {
        MtlsMode::Unset => "UNSET",
        MtlsMode::Disable => "DISABLE",
        MtlsMode::Permissive => "PERMISSIVE",
        MtlsMode::Strict => "STRICT",
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = json(&ErrorView {
        error: message.to_owned(),
    });
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests;
