//! DER certificates written as PEM text, as the certificate service's responses carry them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// PEM wraps its base64 text at this many characters (RFC 7468).
const LINE_LENGTH: usize = 64;

/// `der` as one `CERTIFICATE` PEM block, ending in a newline.
pub(crate) fn certificate_pem(der: &[u8]) -> String {
    let base64 = STANDARD.encode(der);
    let mut pem = String::with_capacity(base64.len() + base64.len() / LINE_LENGTH + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    let mut rest = base64.as_str();
    while !rest.is_empty() {
        // Base64 is ASCII: every index is a character boundary.
        let (line, after) = rest.split_at(rest.len().min(LINE_LENGTH));
        pem.push_str(line);
        pem.push('\n');
        rest = after;
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    #[test]
    fn round_trips_through_a_pem_parser() {
        for length in [0, 1, 47, 48, 49, 600] {
            let der: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let pem = certificate_pem(&der);
            assert!(pem.lines().all(|line| line.len() <= LINE_LENGTH), "{pem}");
            let parsed = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(parsed.as_ref(), der.as_slice(), "{length} bytes");
        }
    }
}
