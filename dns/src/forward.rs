//! Names the mesh does not know, asked of the upstream servers of a resolv.conf, through
//! hickory's resolver: one cache for the node that keeps answers for their TTL, retries, and
//! TCP when a UDP answer comes back truncated.

use std::path::{Path, PathBuf};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::Record;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::system_conf::parse_resolv_conf;

use crate::message::Request;

/// Why the upstream servers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("failed to read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} is not a usable resolv.conf (it needs a nameserver)", .0.display())]
    Parse(PathBuf, #[source] NetError),
    #[error("failed to build the resolver")]
    Build(#[source] NetError),
}

/// What upstream said.
#[derive(Debug)]
pub enum Forwarded {
    /// Records (CNAMEs included), with their remaining TTLs.
    Answer {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// No record of the type: NXDOMAIN, or NOERROR for a name that has other types, with the
    /// zone's SOA when upstream gave one, for the client's negative cache.
    NoRecords {
        code: ResponseCode,
        soa: Option<Box<Record>>,
    },
    /// Upstream failed (timeout, SERVFAIL, REFUSED...): `code` is what the client is told.
    Failed { code: ResponseCode, error: String },
}

impl Forwarded {
    /// Whether upstream failed to answer, as `istio_dns_upstream_failures_total` counts it:
    /// ztunnel counts an answer without records as a failure too.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Answer { .. })
    }
}

/// The node's upstream resolver.
#[derive(Debug, Clone)]
pub struct Forwarder {
    resolver: TokioResolver,
}

impl Forwarder {
    /// Forwards to the nameservers of the resolv.conf at `path`, with its options (timeout,
    /// attempts, EDNS) but not its search list: clients send fully qualified names.
    pub fn from_resolv_conf(path: &Path) -> Result<Self, ForwarderError> {
        let text = std::fs::read(path).map_err(|e| ForwarderError::Read(path.to_owned(), e))?;
        let (config, mut options) =
            parse_resolv_conf(text).map_err(|e| ForwarderError::Parse(path.to_owned(), e))?;
        let (_, _, name_servers) = config.into_parts();
        // A proxy answers from DNS only: the node's /etc/hosts is not the pods'.
        options.use_hosts_file = ResolveHosts::Never;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(ForwarderError::Build)?;
        Ok(Self { resolver })
    }

    /// Asks upstream for the request's name and type (or answers from the cache).
    pub async fn forward(&self, request: &Request) -> Forwarded {
        match self
            .resolver
            .lookup(request.fqdn(), request.query_type)
            .await
        {
            Ok(lookup) => {
                let message = lookup.message();
                Forwarded::Answer {
                    answers: message.answers.clone(),
                    additionals: message.additionals.clone(),
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                response_code, soa, ..
            }))) => Forwarded::NoRecords {
                code: response_code,
                soa: soa.map(|soa| Box::new(soa.into_record_of_rdata())),
            },
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Forwarded::Failed {
                code,
                error: format!("upstream answered {code}"),
            },
            Err(error) => Forwarded::Failed {
                code: ResponseCode::ServFail,
                error: error.to_string(),
            },
        }
    }
}
