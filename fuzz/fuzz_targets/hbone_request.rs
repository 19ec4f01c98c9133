//! The CONNECT request of an HBONE stream, as the server receives it. The input is text:
//!
//! ```text
//! CONNECT 10.244.2.7:8080
//! forwarded: for="10.244.1.5:41234"
//! baggage: k8s.namespace.name=shop,k8s.deployment.name=web
//! traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//! ```
//!
//! a method and an authority, then headers; only what `http` accepts becomes part of the request,
//! as h2 hands the server nothing else. The server's checks and the header parsers must answer
//! without panicking, and what the client builds must parse back to what it was built from.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ambit_agent::fuzzing::{self, AGENT_POD_PORTS, BAGGAGE, TRACEPARENT};
use ambit_agent::{Baggage, TraceParent};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;

/// The pod a request arrives at when its authority names no IP.
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 2, 7));

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else {
        return;
    };
    let (baggage, trace) = server(&request);
    client(&request, baggage, trace);
});

fn request(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|&b| b == b'\n');
    let (method, authority) = split_once(lines.next().unwrap_or_default(), b' ');
    let mut builder = Request::builder();
    if let Ok(method) = Method::from_bytes(method) {
        builder = builder.method(method);
    }
    if let Ok(uri) = Uri::try_from(authority) {
        builder = builder.uri(uri);
    }
    for line in lines {
        let (name, value) = split_once(line, b':');
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            builder = builder.header(name, value);
        }
    }
    builder.body(()).ok()
}

fn split_once(line: &[u8], separator: u8) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == separator) {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => (line, &[]),
    }
}

/// What the server does with a request: checks where it goes, reads baggage and traceparent.
fn server(request: &Request<()>) -> (Baggage, Option<TraceParent>) {
    let named = authority_addr(request).map(|a| a.ip());
    for local in [Some(LOCAL), named].into_iter().flatten() {
        match fuzzing::destination(request, local, &AGENT_POD_PORTS) {
            Ok(destination) => {
                assert_eq!(request.method(), Method::CONNECT);
                assert_eq!(destination.ip(), local);
                assert!(!AGENT_POD_PORTS.contains(&destination.port()));
            }
            Err((status, _)) => assert!(
                status == StatusCode::BAD_REQUEST || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}"
            ),
        }
    }
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    let baggage = header(BAGGAGE).map(Baggage::parse).unwrap_or_default();
    let trace = header(TRACEPARENT).and_then(|v| v.parse::<TraceParent>().ok());
    // Beyond what the server reads: any UTF-8 value.
    for value in request.headers().get_all(BAGGAGE) {
        if let Ok(value) = std::str::from_utf8(value.as_bytes()) {
            let parsed = Baggage::parse(value);
            let written = parsed.to_string();
            // Percent-encoding can grow a value past the length a reader accepts (8192 bytes).
            if written.len() <= 8192 {
                assert_eq!(Baggage::parse(&written), parsed);
            }
        }
    }
    for value in request.headers().get_all(TRACEPARENT) {
        if let Ok(parsed) = std::str::from_utf8(value.as_bytes()).map(str::parse::<TraceParent>) {
            let _ = parsed.map(|t| assert_eq!(t.to_string().parse(), Ok(t)));
        }
    }
    (baggage, trace)
}

/// The CONNECT a client would send for what the request says parses back to it.
fn client(request: &Request<()>, baggage: Baggage, trace: Option<TraceParent>) {
    let Some(authority) = authority_addr(request) else {
        return;
    };
    let source = forwarded_for(request).unwrap_or(SocketAddr::new(LOCAL, 41000));
    let trace = trace.unwrap_or(TraceParent {
        trace_id: 1,
        parent_id: 1,
        sampled: false,
    });
    let built = fuzzing::connect_request(authority, source, None, Some(&baggage), &trace);
    assert_eq!(
        fuzzing::destination(&built, authority.ip(), &[]),
        Ok(authority)
    );
    let header = |name: &str| built.headers()[name].to_str().ok().map(str::to_owned);
    assert_eq!(header("forwarded"), Some(format!("for=\"{source}\"")));
    assert_eq!(forwarded_for(&built), Some(source));
    assert_eq!(header(BAGGAGE).map(|v| Baggage::parse(&v)), Some(baggage));
    assert_eq!(header(TRACEPARENT).map(|v| v.parse()), Some(Ok(trace)));
}

fn authority_addr(request: &Request<()>) -> Option<SocketAddr> {
    request.uri().authority()?.as_str().parse().ok()
}

/// `for="<ip:port>"`, the only form the client sends (the server does not read `forwarded`).
fn forwarded_for(request: &Request<()>) -> Option<SocketAddr> {
    let value = request.headers().get("forwarded")?.to_str().ok()?;
    value
        .strip_prefix("for=\"")?
        .strip_suffix('"')?
        .parse()
        .ok()
}
