//! ambit's DNS proxy. Every enrolled pod's DNS (UDP and TCP port 53, to any server) is captured
//! to the proxy's sockets inside the pod (127.0.0.1:15053). Names the mesh knows (Services,
//! headless Services' pods, static ServiceEntries) are answered from the agent's model; the rest
//! are forwarded to the node's upstream servers through one cache.
//!
//! The crate knows DNS, not the mesh: the agent answers [`Client::mesh_addresses`] for each pod
//! and is told of every answer ([`Client::answered`]), which is what egress control allows.

mod forward;
pub mod message;
mod metrics;
mod serve;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

pub use forward::{Forwarded, Forwarder, ForwarderError};
pub use message::Request;
pub use metrics::{DnsLabels, DnsMetrics};
pub use serve::{DnsSockets, Limits, ReplySocketFuture, ReplySockets, serve};

/// The TTL of the answers the proxy gives from the mesh, as ztunnel's.
pub const MESH_TTL: Duration = Duration::from_secs(30);

/// One pod, as the proxy serves it.
pub trait Client: Send + Sync + 'static {
    /// The addresses of `name` (lowercase, no trailing dot) that the mesh gives this pod, of
    /// both families; `None` when the mesh does not know the name, which upstream then answers.
    fn mesh_addresses(&self, name: &str) -> Option<Vec<IpAddr>>;

    /// Told of every answer the pod was given.
    fn answered(&self, answer: &Answered<'_>);

    /// The pod's canonical service and revision, which its queries are counted under.
    fn canonical(&self) -> (String, String);
}

/// An answer the proxy gave.
#[derive(Debug)]
pub struct Answered<'a> {
    /// The name asked, lowercase, without the trailing dot.
    pub name: &'a str,
    pub query_type: RecordType,
    pub code: ResponseCode,
    /// The addresses in the answer (after any CNAME).
    pub addresses: Vec<IpAddr>,
    /// The shortest TTL of the answer's records.
    pub ttl: Duration,
    pub source: AnswerSource,
}

/// Who answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    Mesh,
    Upstream,
}

impl AnswerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Upstream => "upstream",
        }
    }
}

/// How a query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// The node's DNS proxy: what every pod's server shares.
#[derive(Debug)]
pub struct Proxy {
    forwarder: Forwarder,
    metrics: DnsMetrics,
}

impl Proxy {
    pub fn new(forwarder: Forwarder, metrics: DnsMetrics) -> Self {
        Self { forwarder, metrics }
    }

    /// The reply to the query in `bytes` from `client`, encoded for `transport`; `None` for a
    /// packet not to answer.
    pub async fn answer(
        &self,
        client: &dyn Client,
        bytes: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let request = match Request::parse(bytes) {
            Ok(request) => request,
            Err(reply) => return reply,
        };
        let labels = self.labels(client, &request, transport);
        self.metrics.requests.get_or_create(&labels).inc();
        let local = matches!(request.query_type, RecordType::A | RecordType::AAAA)
            .then(|| client.mesh_addresses(&request.name))
            .flatten();
        let (response, answered) = match local {
            Some(addresses) => mesh_answer(&request, &addresses),
            None => self.forward(&request, &labels).await,
        };
        client.answered(&answered);
        let limit = match transport {
            Transport::Udp => request.udp_limit(),
            Transport::Tcp => u16::MAX,
        };
        message::encode(&response, limit)
    }

    async fn forward<'r>(
        &self,
        request: &'r Request,
        labels: &DnsLabels,
    ) -> (Message, Answered<'r>) {
        self.metrics.upstream_requests.get_or_create(labels).inc();
        let started = Instant::now();
        let forwarded = self.forwarder.forward(request).await;
        self.metrics
            .upstream_duration
            .get_or_create(labels)
            .observe(started.elapsed().as_secs_f64());
        if forwarded.is_failure() {
            self.metrics.upstream_failures.get_or_create(labels).inc();
        }
        let mut answered = Answered {
            name: &request.name,
            query_type: request.query_type,
            code: ResponseCode::NoError,
            addresses: Vec::new(),
            ttl: Duration::ZERO,
            source: AnswerSource::Upstream,
        };
        let response = match forwarded {
            Forwarded::Answer {
                answers,
                additionals,
            } => {
                answered.addresses = answers.iter().filter_map(address).collect();
                let ttl = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
                answered.ttl = Duration::from_secs(u64::from(ttl));
                let mut response = request.response(ResponseCode::NoError);
                response.add_answers(answers);
                response.add_additionals(additionals);
                response
            }
            Forwarded::NoRecords { code, soa } => {
                answered.code = code;
                let mut response = request.response(code);
                response.add_authorities(soa.map(|soa| *soa));
                response
            }
            Forwarded::Failed { code, error } => {
                tracing::debug!(name = %request.name, %error, "upstream DNS failed");
                answered.code = code;
                request.response(code)
            }
        };
        (response, answered)
    }

    fn labels(&self, client: &dyn Client, request: &Request, transport: Transport) -> DnsLabels {
        let (service, revision) = client.canonical();
        DnsLabels {
            request_query_type: request.query_type.to_string().to_ascii_lowercase(),
            request_protocol: transport.as_str(),
            source_canonical_service: service,
            source_canonical_revision: revision,
        }
    }

    pub(crate) fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }
}

/// The mesh's answer: its addresses of the family asked, authoritative; none (NOERROR) when the
/// name has only addresses of the other family.
fn mesh_answer<'r>(request: &'r Request, addresses: &[IpAddr]) -> (Message, Answered<'r>) {
    let mut response = request.response(ResponseCode::NoError);
    response.metadata.authoritative = true;
    let ttl = u32::try_from(MESH_TTL.as_secs()).unwrap_or(u32::MAX);
    let wanted: Vec<IpAddr> = addresses
        .iter()
        .filter(|ip| match request.query_type {
            RecordType::A => ip.is_ipv4(),
            _ => ip.is_ipv6(),
        })
        .copied()
        .collect();
    for ip in &wanted {
        let data = match ip {
            IpAddr::V4(ip) => RData::A(A(*ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(*ip)),
        };
        response.add_answer(Record::from_rdata(request.fqdn(), ttl, data));
    }
    let answered = Answered {
        name: &request.name,
        query_type: request.query_type,
        code: ResponseCode::NoError,
        addresses: wanted,
        ttl: MESH_TTL,
        source: AnswerSource::Mesh,
    };
    (response, answered)
}

fn address(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(A(ip)) => Some(IpAddr::V4(*ip)),
        RData::AAAA(AAAA(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}
