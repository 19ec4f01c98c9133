//! A certificate signing request as `ambit ca` receives it from any caller that holds a valid
//! token: arbitrary DER in a PEM envelope through the CA's parse, signature check, SAN check
//! and signing. Refusals are fine, panics are not.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use ambit_identity::{Identity, LocalCa};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;

static CA: LazyLock<(LocalCa, tempfile::TempDir)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("a temporary directory for the CA");
    let trust_domain = "cluster.local".parse().expect("a valid trust domain");
    let ca = LocalCa::load_or_create(dir.path(), &trust_domain).expect("a new root CA");
    (ca, dir)
});

static IDENTITY: LazyLock<Identity> = LazyLock::new(|| {
    "spiffe://cluster.local/ns/shop/sa/web"
        .parse()
        .expect("a valid identity")
});

fuzz_target!(|der: &[u8]| {
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        STANDARD.encode(der)
    );
    let _ = CA.0.sign_request(&pem, &IDENTITY, Duration::from_secs(60));
});
