//! A DNS query as the proxy receives it from any pod: arbitrary bytes through the parse, then an
//! answer built for it and encoded for UDP (truncated to what the client takes) and for TCP.
//! Refusals are fine, panics are not.

#![no_main]

use std::net::Ipv4Addr;

use ambit_dns::Request;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let request = match Request::parse(bytes) {
        Ok(request) => request,
        Err(reply) => {
            if let Some(reply) = reply {
                assert!(reply.len() >= 12, "an error reply has a header");
            }
            return;
        }
    };
    let mut response = request.response(ResponseCode::NoError);
    for last in 0..40 {
        let data = RData::A(A(Ipv4Addr::new(192, 0, 2, last)));
        response.add_answer(Record::from_rdata(request.fqdn(), 30, data));
    }
    let udp = request.encode(&response, request.udp_limit());
    assert!(udp.len() <= usize::from(request.udp_limit()));
    let _ = request.encode(&response, u16::MAX);
});
