//! The admin API's URL query parameters: written by `ambit debug`, read by the agent.

/// `key=value` pairs joined with `&`, each value percent-encoded.
pub(crate) fn encode(pairs: &[(&str, &str)]) -> String {
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", percent_encode(value)))
        .collect();
    encoded.join("&")
}

/// The value of `key` in `query`, percent-decoded.
pub(crate) fn value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_the_round_trip() {
        let from = "spiffe://cluster.local/ns/shop/sa/front end";
        let query = encode(&[("from", from), ("to", "10.0.0.1:80")]);
        assert_eq!(value(&query, "from").as_deref(), Some(from));
        assert_eq!(value(&query, "to").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(value(&query, "level"), None);
        assert_eq!(value("level=%zz", "level").as_deref(), Some("%zz"));
    }
}
