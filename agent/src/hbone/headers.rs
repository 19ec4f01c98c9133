//! The CONNECT request of an HBONE stream: building it on the client, checking it on the server.
//! Pure functions, tested without sockets.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::{HeaderValue, Method, Request, StatusCode};

pub(crate) const BAGGAGE: &str = "baggage";
pub(crate) const TRACEPARENT: &str = "traceparent";

/// The longest `baggage` header read, as W3C baggage limits it; a longer one is ignored whole.
const MAX_BAGGAGE_LEN: usize = 8192;
/// The length of a version 00 `traceparent`, and the part of a later version that is read.
const TRACEPARENT_LEN: usize = 55;

/// Why the server refuses a CONNECT request before connecting anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error("destination {destination} is not this workload ({local})")]
    WrongDestination { destination: IpAddr, local: IpAddr },
    #[error("destination port {0} belongs to the agent")]
    AgentPort(u16),
}

impl RequestError {
    /// The status the server answers with, as ztunnel does.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NotConnect(_) | Self::BadAuthority(_) | Self::WrongDestination { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::AgentPort(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks a CONNECT request that arrived on a connection to `local` and returns where it goes.
pub(crate) fn destination<B>(
    request: &Request<B>,
    local: IpAddr,
    agent_ports: &[u16],
) -> Result<SocketAddr, RequestError> {
    let destination = authority(request)?;
    if destination.ip() != local {
        return Err(RequestError::WrongDestination {
            destination: destination.ip(),
            local,
        });
    }
    if agent_ports.contains(&destination.port()) {
        return Err(RequestError::AgentPort(destination.port()));
    }
    Ok(destination)
}

/// Where a CONNECT request asks to go, as it addressed it: `:authority`, an `ip:port`.
pub(crate) fn authority<B>(request: &Request<B>) -> Result<SocketAddr, RequestError> {
    if request.method() != Method::CONNECT {
        return Err(RequestError::NotConnect(request.method().clone()));
    }
    let authority = request.uri().authority().map_or("", |a| a.as_str());
    authority
        .parse()
        .map_err(|_| RequestError::BadAuthority(authority.to_owned()))
}

/// The trace a CONNECT request belongs to; `None` when it names none or a malformed one.
pub(crate) fn trace<B>(request: &Request<B>) -> Option<TraceParent> {
    let header = request.headers().get(TRACEPARENT)?.to_str().ok()?;
    header.parse().ok()
}

/// The CONNECT request for a stream to `authority` on behalf of the client at `source`, which
/// addressed the Service `service` if any.
pub(crate) fn connect_request(
    authority: SocketAddr,
    source: SocketAddr,
    service: Option<&str>,
    baggage: Option<&Baggage>,
    trace: &TraceParent,
) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    // A socket address always forms a valid authority.
    *request.uri_mut() = http::Uri::try_from(authority.to_string())
        .unwrap_or_else(|e| unreachable!("{authority} is a valid authority: {e}"));
    let headers = request.headers_mut();
    headers.insert(http::header::FORWARDED, forwarded(source, service));
    if let Some(baggage) = baggage {
        headers.insert(BAGGAGE, header_value(&baggage.to_string()));
    }
    headers.insert(TRACEPARENT, header_value(&trace.to_string()));
    request
}

/// `for="<ip:port>"` (RFC 7239: quoted, because of the colon), then `;host=<service>` as ztunnel
/// sends it; a hostname that is no valid header value (the cluster's data is not trusted to be
/// well formed) is left out.
fn forwarded(source: SocketAddr, service: Option<&str>) -> HeaderValue {
    let client = format!("for=\"{source}\"");
    service
        .and_then(|host| HeaderValue::from_str(&format!("{client};host={host}")).ok())
        .unwrap_or_else(|| header_value(&client))
}

/// Every header value built here is visible ASCII: addresses, hex and percent-encoded text.
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value)
        .unwrap_or_else(|e| unreachable!("{value:?} is a valid header value: {e}"))
}

/// The kinds of workload that W3C baggage names, as `k8s.<kind>.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    DaemonSet,
    StatefulSet,
    Job,
    CronJob,
    Pod,
}

impl WorkloadKind {
    const ALL: [Self; 6] = [
        Self::Deployment,
        Self::DaemonSet,
        Self::StatefulSet,
        Self::Job,
        Self::CronJob,
        Self::Pod,
    ];

    fn baggage_key(self) -> &'static str {
        match self {
            Self::Deployment => "k8s.deployment.name",
            Self::DaemonSet => "k8s.daemonset.name",
            Self::StatefulSet => "k8s.statefulset.name",
            Self::Job => "k8s.job.name",
            Self::CronJob => "k8s.cronjob.name",
            Self::Pod => "k8s.pod.name",
        }
    }
}

/// What the client tells the server about the workload it speaks for, in the `baggage` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<(WorkloadKind, String)>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl Baggage {
    /// Reads the entries ambit knows and ignores the rest; malformed members are skipped, since
    /// baggage is informational and must never fail a connection. A header longer than W3C
    /// allows (8192 bytes) is ignored.
    pub fn parse(header: &str) -> Self {
        let mut baggage = Self::default();
        if header.len() > MAX_BAGGAGE_LEN {
            return baggage;
        }
        for member in header.split(',') {
            let pair = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let Some(value) = percent_decode(value.trim()) else {
                continue;
            };
            match key.trim() {
                "k8s.cluster.name" => baggage.cluster = Some(value),
                "k8s.namespace.name" => baggage.namespace = Some(value),
                "service.name" => baggage.service_name = Some(value),
                "service.version" => baggage.service_version = Some(value),
                key => {
                    if let Some(kind) = WorkloadKind::ALL
                        .into_iter()
                        .find(|k| k.baggage_key() == key)
                    {
                        baggage.workload = Some((kind, value));
                    }
                }
            }
        }
        baggage
    }
}

impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = self.workload.as_ref().map(|(k, n)| (k.baggage_key(), n));
        let members = [
            ("k8s.cluster.name", self.cluster.as_ref()),
            ("k8s.namespace.name", self.namespace.as_ref()),
        ]
        .into_iter()
        .chain(workload.map(|(key, name)| (key, Some(name))))
        .chain([
            ("service.name", self.service_name.as_ref()),
            ("service.version", self.service_version.as_ref()),
        ]);
        let mut separator = "";
        for (key, value) in members {
            if let Some(value) = value {
                write!(f, "{separator}{key}=")?;
                percent_encode(f, value)?;
                separator = ",";
            }
        }
        Ok(())
    }
}

/// W3C baggage values allow visible ASCII except `"`, `,`, `;`, `\` and `%`; the rest is
/// percent-encoded.
fn percent_encode(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    for byte in value.bytes() {
        if byte.is_ascii_graphic() && !matches!(byte, b'"' | b',' | b';' | b'\\' | b'%') {
            write!(f, "{}", byte as char)?;
        } else {
            write!(f, "%{byte:02X}")?;
        }
    }
    Ok(())
}

fn percent_decode(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut input = value.bytes();
    while let Some(byte) = input.next() {
        if byte == b'%' {
            let hex = [input.next()?, input.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).ok()
}

/// A W3C `traceparent`: which trace a tunneled connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace, not sampled.
    pub fn random() -> Self {
        Self {
            trace_id: fastrand::u128(1..),
            parent_id: fastrand::u64(1..),
            sampled: false,
        }
    }

    /// The same trace, carried one hop further: a proxy that forwards a tunnel is the parent of
    /// the next one.
    pub(crate) fn next_hop(self) -> Self {
        Self {
            parent_id: fastrand::u64(1..),
            ..self
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.parent_id,
            u8::from(self.sampled)
        )
    }
}

/// Why a `traceparent` header was ignored; holds at most the first bytes of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed traceparent {0:?}")]
pub struct TraceParentError(String);

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A peer may send anything up to the header list limit: keep no more than a valid one.
        let invalid = || TraceParentError(s.chars().take(TRACEPARENT_LEN).collect());
        // A later version may add fields after a dash: read the ones version 00 defines, ignore
        // the rest (W3C Trace Context, "Versioning of traceparent"). Forwarded, it is version 00.
        let (known, later) = s.split_at_checked(TRACEPARENT_LEN).ok_or_else(invalid)?;
        let hex = |field: &str, len: usize| {
            (field.len() == len
                && field
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| u128::from_str_radix(field, 16).ok())
            .flatten()
        };
        let mut fields = known.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(invalid());
        };
        match hex(version, 2) {
            Some(0) if later.is_empty() => {}
            Some(1..0xff) if later.is_empty() || later.starts_with('-') => {}
            _ => return Err(invalid()),
        }
        let trace_id = hex(trace, 32).filter(|&id| id != 0).ok_or_else(invalid)?;
        let parent_id = hex(parent, 16)
            .and_then(|id| u64::try_from(id).ok())
            .filter(|&id| id != 0)
            .ok_or_else(invalid)?;
        let flags = hex(flags, 2).ok_or_else(invalid)?;
        Ok(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    fn request(method: Method, authority: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .unwrap()
    }

    #[test]
    fn accepts_connect_to_this_workload() {
        let req = request(Method::CONNECT, "10.0.0.7:8080");
        assert_eq!(
            destination(&req, LOCAL, &[15008]),
            Ok("10.0.0.7:8080".parse().unwrap())
        );
    }

    #[test]
    fn refuses_bad_requests_with_ztunnel_statuses() {
        let cases = [
            (Method::GET, "10.0.0.7:8080", StatusCode::BAD_REQUEST),
            (Method::POST, "10.0.0.7:8080", StatusCode::BAD_REQUEST),
            (
                Method::CONNECT,
                "reviews.default.svc:9080",
                StatusCode::BAD_REQUEST,
            ),
            (Method::CONNECT, "10.0.0.7", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "10.0.0.8:8080", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "[::1]:8080", StatusCode::BAD_REQUEST),
            (
                Method::CONNECT,
                "10.0.0.7:15008",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (method, authority, status) in cases {
            let err = destination(&request(method.clone(), authority), LOCAL, &[15001, 15008])
                .unwrap_err();
            assert_eq!(err.status(), status, "{method} {authority}: {err}");
        }
    }

    #[test]
    fn connect_request_carries_ztunnel_headers() {
        let trace = TraceParent::random();
        let baggage = Baggage {
            namespace: Some("shop".into()),
            workload: Some((WorkloadKind::Deployment, "web".into())),
            ..Baggage::default()
        };
        let req = connect_request(
            "[fd00::7]:8080".parse().unwrap(),
            "[fd00::1]:41000".parse().unwrap(),
            None,
            Some(&baggage),
            &trace,
        );
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "[fd00::7]:8080");
        let header = |name: &str| req.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header("forwarded"), "for=\"[fd00::1]:41000\"");
        assert_eq!(
            header(BAGGAGE),
            "k8s.namespace.name=shop,k8s.deployment.name=web"
        );
        assert_eq!(header(TRACEPARENT).parse::<TraceParent>(), Ok(trace));
        assert_eq!(
            destination(&req, "fd00::7".parse().unwrap(), &[]),
            Ok("[fd00::7]:8080".parse().unwrap())
        );
    }

    #[test]
    fn forwarded_names_the_service_the_client_addressed() {
        let client = "10.244.0.7:43512".parse().unwrap();
        let authority = "10.244.1.5:8080".parse().unwrap();
        let trace = TraceParent::random();
        let forwarded = |service| {
            let req = connect_request(authority, client, service, None, &trace);
            req.headers()["forwarded"].to_str().unwrap().to_owned()
        };
        assert_eq!(
            forwarded(Some("reviews.shop.svc.cluster.local")),
            "for=\"10.244.0.7:43512\";host=reviews.shop.svc.cluster.local"
        );
        // A hostname no header may carry is left out rather than failing the tunnel.
        assert_eq!(forwarded(Some("bad\nhost")), "for=\"10.244.0.7:43512\"");
    }

    #[test]
    fn baggage_round_trips_and_escapes() {
        let baggage = Baggage {
            cluster: Some("east".into()),
            namespace: Some("shop".into()),
            workload: Some((WorkloadKind::StatefulSet, "db".into())),
            service_name: Some("db".into()),
            service_version: Some("v1,beta; 100%".into()),
        };
        let header = baggage.to_string();
        assert!(
            header.contains("service.version=v1%2Cbeta%3B%20100%25"),
            "{header}"
        );
        assert_eq!(Baggage::parse(&header), baggage);
    }

    #[test]
    fn baggage_parsing_skips_what_it_does_not_understand() {
        let parsed = Baggage::parse(
            "k8s.namespace.name=shop;prop=1, junk, other.key=1, k8s.pod.name=%zz, service.name = web",
        );
        assert_eq!(
            parsed,
            Baggage {
                namespace: Some("shop".into()),
                service_name: Some("web".into()),
                ..Baggage::default()
            }
        );
    }

    #[test]
    fn oversized_informational_headers_are_ignored() {
        let namespace = "k8s.namespace.name=shop";
        let padded = format!("{namespace},{}", "x".repeat(MAX_BAGGAGE_LEN));
        assert_eq!(Baggage::parse(&padded), Baggage::default());
        let at_limit = format!(
            "{namespace},{}",
            "x".repeat(MAX_BAGGAGE_LEN - namespace.len() - 1)
        );
        assert_eq!(Baggage::parse(&at_limit).namespace.as_deref(), Some("shop"));

        let huge = format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01{}",
            "0".repeat(64 * 1024)
        );
        let TraceParentError(kept) = huge.parse::<TraceParent>().unwrap_err();
        assert_eq!(kept.len(), TRACEPARENT_LEN);
    }

    #[test]
    fn traceparent_parses_the_w3c_form_only() {
        for good in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Later versions: what version 00 defines is read, the fields they add ignored.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-adds",
        ] {
            let parsed: TraceParent = good.parse().unwrap();
            assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
            assert_eq!(parsed.parent_id, 0x00f067aa0ba902b7);
            assert!(parsed.sampled);
        }
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Lowercase only, as W3C writes them.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_next_hop_continues_the_trace_under_a_new_parent() {
        let received: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let forwarded = received.next_hop();
        assert_eq!(forwarded.trace_id, received.trace_id);
        assert_eq!(forwarded.sampled, received.sampled);
        assert_ne!(forwarded.parent_id, received.parent_id);
        assert_ne!(forwarded.parent_id, 0, "zero is not a valid parent id");
    }
}
