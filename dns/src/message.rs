//! DNS messages as the proxy reads and writes them: one question per query, hostile input
//! refused before it costs anything, and answers cut to what the client can take.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

/// A header: id, flags and four counts.
const HEADER_LEN: usize = 12;
/// The TC bit, in the header's third byte.
const TRUNCATED: u8 = 0x02;
/// What a UDP client without EDNS can take.
const MIN_UDP_PAYLOAD: u16 = 512;
/// The most the proxy sends over UDP, whatever the client advertises: larger datagrams fragment.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// A query the proxy answers: one question, read from a query that parsed.
#[derive(Debug, Clone)]
pub struct Request {
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    query: Query,
    /// The client's EDNS: what it takes over UDP.
    edns: Option<Edns>,
    /// The question's name, lowercase, without the trailing dot.
    pub name: String,
    pub query_type: RecordType,
}

impl Request {
    /// Reads a query. `Err(Some(reply))` is an error to send back (FORMERR, NOTIMP, BADVERS),
    /// `Err(None)` a packet to drop: too short to answer, or itself a response, which is never
    /// answered so that two servers cannot bounce a packet between them.
    pub fn parse(bytes: &[u8]) -> Result<Self, Option<Vec<u8>>> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(None);
        };
        let id = u16::from_be_bytes([header[0], header[1]]);
        if header[2] & 0x80 != 0 {
            return Err(None);
        }
        let op_code = OpCode::from_u8((header[2] >> 3) & 0x0f);
        let refuse = |code| Err(Some(error(id, op_code, code, None)));
        if op_code != OpCode::Query {
            return refuse(ResponseCode::NotImp);
        }
        // One question, as every resolver asks; checked before the parser allocates for them.
        if u16::from_be_bytes([header[4], header[5]]) != 1 {
            return refuse(ResponseCode::FormErr);
        }
        let Ok(mut message) = Message::from_vec(bytes) else {
            return refuse(ResponseCode::FormErr);
        };
        let Some(query) = message.queries.pop() else {
            return refuse(ResponseCode::FormErr);
        };
        if let Some(edns) = message.edns.as_ref().filter(|edns| edns.version() > 0) {
            // RFC 6891: a version this server does not speak is answered BADVERS, with its own.
            let version = edns.version();
            tracing::debug!(version, "a query with an EDNS version above 0");
            return Err(Some(error(
                id,
                op_code,
                ResponseCode::BADVERS,
                Some(our_edns()),
            )));
        }
        let name = query.name().to_lowercase().to_ascii();
        Ok(Self {
            id,
            recursion_desired: message.metadata.recursion_desired,
            checking_disabled: message.metadata.checking_disabled,
            name: name.trim_end_matches('.').to_owned(),
            query_type: query.query_type(),
            edns: message.edns.take(),
            query,
        })
    }

    /// Whether the question is of the Internet class, the only one the mesh has names in.
    pub fn is_internet(&self) -> bool {
        self.query.query_class() == DNSClass::IN
    }

    /// The question's name as asked, fully qualified.
    pub fn fqdn(&self) -> Name {
        let mut name = self.query.name().clone();
        name.set_fqdn(true);
        name
    }

    /// The question, as asked.
    pub fn query(&self) -> &Query {
        &self.query
    }

    /// An empty response to this request, with `code`.
    pub fn response(&self, code: ResponseCode) -> Message {
        let mut response = Message::response(self.id, OpCode::Query);
        response.metadata.recursion_desired = self.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.checking_disabled = self.checking_disabled;
        response.metadata.response_code = code;
        response.add_query(self.query.clone());
        if self.edns.is_some() {
            response.set_edns(our_edns());
        }
        response
    }

    /// The largest response the client takes over UDP: what its EDNS advertises (at least 512
    /// bytes, at most [`MAX_UDP_PAYLOAD`]), 512 without EDNS.
    pub fn udp_limit(&self) -> u16 {
        self.edns.as_ref().map_or(MIN_UDP_PAYLOAD, |edns| {
            edns.max_payload().clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
        })
    }

    /// `response` encoded in at most `limit` bytes. One that does not fit becomes the question
    /// alone with the TC bit set, so that the client asks again over TCP rather than act on part
    /// of an answer; one that cannot be encoded, SERVFAIL.
    pub fn encode(&self, response: &Message, limit: u16) -> Vec<u8> {
        match encode(response, limit) {
            Some(bytes) if bytes.get(2).is_some_and(|flags| flags & TRUNCATED == 0) => bytes,
            Some(_) => encode(&response.truncate(), limit).unwrap_or_default(),
            None => encode(&self.response(ResponseCode::ServFail), limit).unwrap_or_default(),
        }
    }
}

/// The proxy's EDNS: version 0, and what it takes over UDP.
fn our_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    edns
}

/// `message` encoded in at most `limit` bytes; records that do not fit are left out, with TC
/// set.
fn encode(message: &Message, limit: u16) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(usize::from(limit).min(4096));
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(limit);
    match message.emit(&mut encoder) {
        Ok(()) => Some(bytes),
        Err(error) => {
            tracing::debug!(%error, "failed to encode a DNS response");
            None
        }
    }
}

/// An error response with no question, for a query that could not be read.
fn error(id: u16, op_code: OpCode, code: ResponseCode, edns: Option<Edns>) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Response, op_code);
    message.metadata.response_code = code;
    message.edns = edns;
    // A header alone always encodes.
    encode(&message, MIN_UDP_PAYLOAD).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};

    use super::*;

    fn query(name: &str, query_type: RecordType) -> Vec<u8> {
        let mut message = Message::new(7, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
        message.to_vec().unwrap()
    }

    fn code(reply: &[u8]) -> ResponseCode {
        Message::from_vec(reply).unwrap().metadata.response_code
    }

    #[test]
    fn reads_a_query() {
        let request = Request::parse(&query("Web.Shop.svc.cluster.local.", RecordType::A)).unwrap();
        assert_eq!(request.name, "web.shop.svc.cluster.local");
        assert_eq!(request.query_type, RecordType::A);
        assert_eq!(request.udp_limit(), 512);
    }

    #[test]
    fn refuses_what_it_cannot_answer() {
        let mut bytes = query("a.example.", RecordType::A);
        assert!(
            matches!(Request::parse(&bytes[..5]), Err(None)),
            "too short"
        );

        let mut response = bytes.clone();
        response[2] |= 0x80;
        assert!(matches!(Request::parse(&response), Err(None)), "a response");

        let mut notify = bytes.clone();
        notify[2] |= 4 << 3;
        let Err(Some(reply)) = Request::parse(&notify) else {
            panic!()
        };
        assert_eq!(code(&reply), ResponseCode::NotImp);

        bytes[5] = 2;
        let Err(Some(reply)) = Request::parse(&bytes) else {
            panic!()
        };
        assert_eq!(code(&reply), ResponseCode::FormErr);
        assert_eq!(Message::from_vec(&reply).unwrap().metadata.id, 7);
    }

    #[test]
    fn an_unknown_edns_version_is_answered_badvers() {
        let mut message = Message::from_vec(&query("a.example.", RecordType::A)).unwrap();
        let mut edns = Edns::new();
        edns.set_version(1);
        message.set_edns(edns);
        let Err(Some(reply)) = Request::parse(&message.to_vec().unwrap()) else {
            panic!()
        };
        // 16: BADVERS, which hickory reads back under TSIG's name for the same code.
        assert_eq!(u16::from(code(&reply)), u16::from(ResponseCode::BADVERS));
    }

    #[test]
    fn a_compression_loop_is_a_format_error() {
        let mut bytes = query("a.example.", RecordType::A);
        // The question's name becomes a pointer to itself.
        bytes.truncate(HEADER_LEN);
        bytes.extend_from_slice(&[0xc0, HEADER_LEN as u8, 0, 1, 0, 1]);
        let Err(Some(reply)) = Request::parse(&bytes) else {
            panic!()
        };
        assert_eq!(code(&reply), ResponseCode::FormErr);
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated() {
        let request = Request::parse(&query("big.example.", RecordType::A)).unwrap();
        let mut response = request.response(ResponseCode::NoError);
        for i in 0..100u8 {
            let a = RData::A(A(Ipv4Addr::new(192, 0, 2, i)));
            response.add_answer(Record::from_rdata(request.fqdn(), 30, a));
        }
        let udp = request.encode(&response, request.udp_limit());
        assert!(udp.len() <= 512);
        let read = Message::from_vec(&udp).unwrap();
        assert!(read.metadata.truncation);
        assert!(read.answers.is_empty(), "the question alone");
        assert_eq!(read.queries.len(), 1);
        let tcp = Message::from_vec(&request.encode(&response, u16::MAX)).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
    }
}
