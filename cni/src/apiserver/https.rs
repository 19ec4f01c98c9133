//! One blocking HTTPS GET: HTTP/1.1 with `Connection: close`, TLS verified against the
//! kubeconfig's CA, the whole exchange within a deadline.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The largest response accepted, headers included; a pod object is a few KiB.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpsError {
    #[error("server {0:?} is not an https:// URL with a host")]
    BadServer(String),
    #[error("the certificate authority holds no usable PEM certificate")]
    CertificateAuthority,
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] io::Error),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("the exchange with {0} failed")]
    Exchange(String, #[source] io::Error),
    #[error("the deadline passed")]
    TimedOut,
    #[error("the response is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("the response is malformed: {0}")]
    Malformed(&'static str),
}

/// A response's status and body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// An API server's address and the TLS configuration that verifies it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `host:port` to connect to (`[v6]:port` for IPv6).
    authority: String,
    server_name: ServerName<'static>,
    /// A path prefix from the server URL, without a trailing slash.
    base_path: String,
    tls: Arc<ClientConfig>,
}

impl Endpoint {
    pub(crate) fn new(server: &str, certificate_authority_pem: &[u8]) -> Result<Self, HttpsError> {
        let bad = || HttpsError::BadServer(server.to_owned());
        let rest = server.strip_prefix("https://").ok_or_else(bad)?;
        let (authority, base_path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = split_host_port(authority).ok_or_else(bad)?;
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(certificate_authority_pem) {
            let certificate = certificate.map_err(|_| HttpsError::CertificateAuthority)?;
            roots
                .add(certificate)
                .map_err(|_| HttpsError::CertificateAuthority)?;
        }
        if roots.is_empty() {
            return Err(HttpsError::CertificateAuthority);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(HttpsError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            authority,
            server_name,
            base_path: base_path.trim_end_matches('/').to_owned(),
            tls: Arc::new(tls),
        })
    }

    /// GETs `path` with `token` as bearer, everything done by `deadline`.
    pub(crate) fn get(
        &self,
        path: &str,
        token: &str,
        deadline: Instant,
    ) -> Result<Response, HttpsError> {
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(HttpsError::TimedOut)
            } else {
                Ok(left)
            }
        };
        let addresses = self
            .authority
            .to_socket_addrs()
            .map_err(|e| HttpsError::Resolve(self.authority.clone(), e))?;
        let mut last_error = io::Error::from(io::ErrorKind::AddrNotAvailable);
        let mut connected = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, left()?) {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(error) => last_error = error,
            }
        }
        let socket =
            connected.ok_or_else(|| HttpsError::Connect(self.authority.clone(), last_error))?;
        let exchange = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpsError::TimedOut,
            _ => HttpsError::Exchange(self.authority.clone(), e),
        };
        let connection = ClientConnection::new(Arc::clone(&self.tls), self.server_name.clone())
            .map_err(HttpsError::Tls)?;
        let mut stream = StreamOwned::new(connection, socket);
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Accept: application/json\r\nUser-Agent: ambit-cni\r\nConnection: close\r\n\r\n",
            self.base_path, self.authority
        );
        stream
            .sock
            .set_write_timeout(Some(left()?))
            .map_err(exchange)?;
        stream.write_all(request.as_bytes()).map_err(exchange)?;
        stream.flush().map_err(exchange)?;
        let mut received = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            stream
                .sock
                .set_read_timeout(Some(left()?))
                .map_err(exchange)?;
            let read = match stream.read(&mut buffer) {
                Ok(read) => read,
                // A server that closes without close_notify: whatever came is judged below.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(exchange(error)),
            };
            received.extend_from_slice(&buffer[..read]);
            if received.len() > MAX_RESPONSE_BYTES {
                return Err(HttpsError::TooLarge);
            }
            if let Some(response) = parse_response(&received, read == 0)? {
                return Ok(response);
            }
        }
    }
}

fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, rest) = bracketed.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if rest.is_empty() => 443,
            None => return None,
        };
        return Some((host, port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, 443),
    };
    (!host.is_empty()).then_some((host, port))
}

/// The response in `bytes` once it is complete; `None` while more may come. `closed` says the
/// peer closed, after which an incomplete response is an error.
fn parse_response(bytes: &[u8], closed: bool) -> Result<Option<Response>, HttpsError> {
    let incomplete = |what| {
        if closed {
            Err(HttpsError::Malformed(what))
        } else {
            Ok(None)
        }
    };
    let Some(header_end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        return incomplete("the connection closed inside the headers");
    };
    let head = std::str::from_utf8(&bytes[..header_end])
        .map_err(|_| HttpsError::Malformed("the headers are not UTF-8"))?;
    let body = &bytes[header_end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1."))
        .and_then(|line| line.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or(HttpsError::Malformed("the status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpsError::Malformed("a header line"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| HttpsError::Malformed("content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let body = if chunked {
        match decode_chunked(body)? {
            Some(body) => body,
            None => return incomplete("the connection closed inside a chunk"),
        }
    } else if let Some(length) = content_length {
        match body.get(..length) {
            Some(body) => body.to_vec(),
            None => return incomplete("the connection closed inside the body"),
        }
    } else if closed {
        body.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response { status, body }))
}

/// The body of a complete chunked encoding, or `None` while the last chunk has not arrived.
fn decode_chunked(mut bytes: &[u8]) -> Result<Option<Vec<u8>>, HttpsError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = bytes.windows(2).position(|window| window == b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&bytes[..line_end])
            .map_err(|_| HttpsError::Malformed("a chunk size"))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpsError::Malformed("a chunk size"))?;
        let data = &bytes[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        let Some(chunk) = data.get(..size) else {
            return Ok(None);
        };
        body.extend_from_slice(chunk);
        match data.get(size..size + 2) {
            Some(b"\r\n") => bytes = &data[size + 2..],
            Some(_) => return Err(HttpsError::Malformed("a chunk's end")),
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_authorities() {
        assert_eq!(split_host_port("10.96.0.1:443"), Some(("10.96.0.1", 443)));
        assert_eq!(split_host_port("api.example"), Some(("api.example", 443)));
        assert_eq!(split_host_port("[fd00::1]:6443"), Some(("fd00::1", 6443)));
        assert_eq!(split_host_port("[fd00::1]"), Some(("fd00::1", 443)));
        assert_eq!(split_host_port("host:port"), None);
        assert_eq!(split_host_port(":443"), None);
    }

    #[test]
    fn refuses_plain_http() {
        assert!(matches!(
            Endpoint::new("http://10.96.0.1", b""),
            Err(HttpsError::BadServer(_))
        ));
    }

    #[test]
    fn a_response_with_a_length_is_complete_once_the_body_is_in() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let cut = &response[..response.len() - 1];
        assert_eq!(parse_response(cut, false).unwrap(), None);
        assert_eq!(
            parse_response(response, false).unwrap(),
            Some(Response {
                status: 200,
                body: b"{}".to_vec()
            })
        );
        assert!(parse_response(cut, true).is_err());
    }

    #[test]
    fn decodes_chunks() {
        let response =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n";
        assert_eq!(parse_response(&response[..60], false).unwrap(), None);
        assert_eq!(
            parse_response(response, false).unwrap(),
            Some(Response {
                status: 404,
                body: b"{\"a\"}".to_vec()
            })
        );
    }

    #[test]
    fn a_body_without_length_ends_with_the_connection() {
        let response = b"HTTP/1.0 200 OK\r\n\r\n{}";
        assert_eq!(parse_response(response, false).unwrap(), None);
        assert_eq!(parse_response(response, true).unwrap().unwrap().body, b"{}");
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_response(b"SSH-2.0\r\n\r\n", false).is_err());
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false
            )
            .is_err()
        );
    }
}
