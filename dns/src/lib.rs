//! ambit's DNS proxy. Every enrolled pod's DNS (UDP and TCP port 53, to any server) is captured
//! to the proxy's sockets inside the pod (127.0.0.1:15053). Names the mesh knows (Services,
//! headless Services' pods, static ServiceEntries) are answered from the agent's model; the rest
//! are forwarded to the node's upstream servers through one cache.
//!
//! The crate knows DNS, not the mesh: the agent answers [`Client::mesh_name`] for each pod
//! and is told of every answer ([`Client::answered`]), which is what egress control allows.

mod forward;
mod message;
mod metrics;
mod serve;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

pub use forward::{Forwarded, Forwarder, ForwarderError};
pub use message::{MAX_UDP_PAYLOAD, Request};
pub use metrics::{DnsLabels, DnsMetrics};
pub use serve::{DnsSockets, Limits, ReplySocketFuture, ReplySockets, serve};

/// The TTL of the answers the proxy gives from the mesh, as ztunnel's.
pub const MESH_TTL: Duration = Duration::from_secs(30);
/// Queries the node's pods may have waiting for upstream at once: a pod flooding it with names
/// no cache holds must not exhaust the node's sockets or its upstream servers.
const UPSTREAM_PENDING: usize = 1024;
/// CNAMEs followed from the question's name to its addresses.
const MAX_CNAME_CHAIN: usize = 8;

/// What the mesh says of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshName {
    /// Its addresses, of both families.
    pub addresses: Vec<IpAddr>,
    /// Whether the mesh is the name's only source: other query types get an empty answer (a
    /// ServiceEntry's host), rather than upstream's (a Service, whose other records the
    /// cluster's DNS has).
    pub addresses_only: bool,
}

/// One pod, as the proxy serves it.
pub trait Client: Send + Sync + 'static {
    /// What the mesh says of `name` (lowercase, no trailing dot) to this pod; `None` when it
    /// does not know the name, which upstream then answers.
    fn mesh_name(&self, name: &str) -> Option<MeshName>;

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
    /// The addresses of the name asked: records of its own, or of the names its CNAMEs lead to;
    /// not the other records an upstream answer may carry.
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
    upstream: Semaphore,
}

impl Proxy {
    pub fn new(forwarder: Forwarder, metrics: DnsMetrics) -> Self {
        Self {
            forwarder,
            metrics,
            upstream: Semaphore::new(UPSTREAM_PENDING),
        }
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
        let mesh = request
            .is_internet()
            .then(|| client.mesh_name(&request.name))
            .flatten();
        let addresses = matches!(request.query_type, RecordType::A | RecordType::AAAA);
        let (response, answered) = match mesh {
            Some(mesh) if addresses || mesh.addresses_only => mesh_answer(&request, &mesh),
            _ => self.forward(&request, &labels).await?,
        };
        client.answered(&answered);
        let limit = match transport {
            Transport::Udp => request.udp_limit(),
            Transport::Tcp => u16::MAX,
        };
        Some(request.encode(&response, limit))
    }

    /// Upstream's answer; `None` (the query is dropped, the client asks again) while the node
    /// has as many queries waiting for upstream as it may.
    async fn forward<'r>(
        &self,
        request: &'r Request,
        labels: &DnsLabels,
    ) -> Option<(Message, Answered<'r>)> {
        let Ok(_permit) = self.upstream.try_acquire() else {
            self.metrics.dropped(metrics::Dropped::UpstreamBusy);
            return None;
        };
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
                let (addresses, ttl) = chain_addresses(&request.fqdn(), &answers);
                answered.addresses = addresses;
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
        Some((response, answered))
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
/// name has only addresses of the other family, or for another type.
fn mesh_answer<'r>(request: &'r Request, mesh: &MeshName) -> (Message, Answered<'r>) {
    let mut response = request.response(ResponseCode::NoError);
    response.metadata.authoritative = true;
    let ttl = u32::try_from(MESH_TTL.as_secs()).unwrap_or(u32::MAX);
    let wanted: Vec<IpAddr> = mesh
        .addresses
        .iter()
        .filter(|ip| match request.query_type {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            _ => false,
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

/// The addresses of `name` in `answers`, following its CNAMEs, and the shortest TTL on the way.
/// Records of other names are left out: an upstream answer may carry what it pleases.
fn chain_addresses(name: &hickory_proto::rr::Name, answers: &[Record]) -> (Vec<IpAddr>, u32) {
    let mut chain = vec![name];
    let mut ttl = u32::MAX;
    while chain.len() <= MAX_CNAME_CHAIN {
        let current = chain[chain.len() - 1];
        let next = answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if record.name == *current => Some((&target.0, record.ttl)),
            _ => None,
        });
        let Some((target, cname_ttl)) = next.filter(|(target, _)| !chain.contains(target)) else {
            break;
        };
        ttl = ttl.min(cname_ttl);
        chain.push(target);
    }
    let last = chain[chain.len() - 1];
    let mut addresses = Vec::new();
    for record in answers.iter().filter(|record| record.name == *last) {
        let address = match &record.data {
            RData::A(A(ip)) => IpAddr::V4(*ip),
            RData::AAAA(AAAA(ip)) => IpAddr::V6(*ip),
            _ => continue,
        };
        ttl = ttl.min(record.ttl);
        addresses.push(address);
    }
    let ttl = if addresses.is_empty() { 0 } else { ttl };
    (addresses, ttl)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::CNAME;

    use super::*;

    fn record(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
    }

    #[test]
    fn only_the_addresses_of_the_name_asked_count() {
        let a = |last| RData::A(A(Ipv4Addr::new(192, 0, 2, last)));
        let answers = [
            record(
                "www.example.",
                300,
                RData::CNAME(CNAME(Name::from_ascii("edge.cdn.").unwrap())),
            ),
            record("edge.cdn.", 60, a(1)),
            record("edge.cdn.", 30, a(2)),
            // Carried along, but not what was asked: never allowed for it.
            record("metadata.internal.", 600, a(254)),
        ];
        let name = Name::from_ascii("WWW.example.").unwrap();
        let (addresses, ttl) = chain_addresses(&name, &answers);
        assert_eq!(
            addresses,
            [
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "192.0.2.2".parse().unwrap()
            ]
        );
        assert_eq!(ttl, 30);

        let looping = [record(
            "a.example.",
            60,
            RData::CNAME(CNAME(Name::from_ascii("a.example.").unwrap())),
        )];
        let (addresses, _) = chain_addresses(&Name::from_ascii("a.example.").unwrap(), &looping);
        assert!(addresses.is_empty());
    }
}
