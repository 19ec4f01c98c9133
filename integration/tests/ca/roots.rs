//! The roots published for the agents in a ConfigMap, kept equal to the CA directory's, and a
//! created root kept in a Secret, which a CA on another empty directory signs under too.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use ambit_integration::{ApiServerProcess, CaProcess, TestCa, logged};

use super::harness::{Ask, api_server, check_issued, grpc_client, kube_client, start_ca_with};
use super::{DEFAULT_TTL, WEB};

const NAMESPACE: &str = "ambit-system";
const ROOT_CONFIGMAP: &str = "ambit-ca-root-cert";
const ROOT_SECRET: &str = "cacerts";
const PUBLISH: [&str; 4] = ["--root-configmap", ROOT_CONFIGMAP, "--namespace", NAMESPACE];
const CA_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];

/// The ConfigMap as an earlier install left it: another root, Helm's label, and a key of the
/// operator's.
const STALE_CONFIGMAP: &str = "
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: ambit-ca-root-cert
  namespace: ambit-system
  labels: {app.kubernetes.io/managed-by: Helm}
data:
  root-cert.pem: not the CA's roots
  note: kept
";

/// A Secret with two of the four files.
const INCOMPLETE_SECRET: &str = "
---
apiVersion: v1
kind: Secret
metadata: {name: cacerts, namespace: ambit-system}
type: Opaque
data:
  ca-cert.pem: c3R1Yg==
  root-cert.pem: c3R1Yg==
";

fn parse_roots(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?)
}

/// Waits until the roots ConfigMap holds exactly `roots`, and returns it.
async fn published(
    api: &ApiServerProcess,
    roots: &[CertificateDer<'static>],
    ca: &CaProcess,
) -> anyhow::Result<ConfigMap> {
    let configmaps = Api::<ConfigMap>::namespaced(kube_client(api).await?, NAMESPACE);
    // The directory is polled every 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = None;
    while Instant::now() < deadline {
        let configmap = configmaps.get_opt(ROOT_CONFIGMAP).await?;
        let held = configmap
            .as_ref()
            .and_then(|c| c.data.as_ref()?.get("root-cert.pem").cloned());
        if let Some(held) = &held
            && parse_roots(held.as_bytes()).is_ok_and(|held| held == roots)
        {
            return configmap.context("the ConfigMap");
        }
        seen = held;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "the ConfigMap does not hold the CA's roots; it holds {seen:?}\n{}",
        ca.log()
    )
}

fn label(configmap: &ConfigMap, name: &str) -> Option<String> {
    configmap.metadata.labels.as_ref()?.get(name).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roots_are_published_and_follow_a_new_root() -> anyhow::Result<()> {
    let first = TestCa::with_intermediate("first")?;
    let mut harness = start_ca_with(&first, STALE_CONFIGMAP, &PUBLISH).await?;
    let configmap = published(
        harness.api(),
        std::slice::from_ref(first.root()),
        harness.ca(),
    )
    .await?;
    ensure!(
        label(&configmap, "app.kubernetes.io/managed-by").as_deref() == Some("ambit-ca"),
        "{:?}",
        configmap.metadata.labels
    );
    let data = configmap.data.unwrap_or_default();
    ensure!(
        data.get("note").map(String::as_str) == Some("kept"),
        "the operator's key: {data:?}"
    );

    let second = TestCa::root_only("second")?;
    harness.replace_ca(&second)?;
    let configmap = published(
        harness.api(),
        std::slice::from_ref(second.root()),
        harness.ca(),
    )
    .await?;
    ensure!(configmap.data.unwrap_or_default().contains_key("note"));
    let failures = harness
        .ca()
        .metric("ambit_ca_root_publish_failures_total ")
        .await?;
    ensure!(
        failures == 0,
        "{failures} failed publishes\n{}",
        harness.ca().log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_root_is_kept_in_a_secret_and_signed_under_after_a_restart() -> anyhow::Result<()>
{
    let api = api_server("").await?;
    let flags = [
        &["--create-root", "--root-secret", ROOT_SECRET][..],
        &PUBLISH,
    ]
    .concat();
    let (first_dir, second_dir) = (api.path("first"), api.path("second"));
    fs::create_dir(&first_dir)?;
    let first = CaProcess::start(&api, "first", &first_dir, &flags).await?;

    let secrets = Api::<Secret>::namespaced(kube_client(&api).await?, NAMESPACE);
    let secret = secrets.get(ROOT_SECRET).await?;
    ensure!(
        secret.type_.as_deref() == Some("Opaque"),
        "{:?}",
        secret.type_
    );
    let kept = secret.data.unwrap_or_default();
    let kept_files: Vec<&str> = kept.keys().map(String::as_str).collect();
    let mut expected = CA_FILES.to_vec();
    expected.sort_unstable();
    ensure!(kept_files == expected, "the Secret holds {kept_files:?}");
    let roots = parse_roots(&kept["root-cert.pem"].0)?;
    ensure!(roots.len() == 1, "{} roots", roots.len());
    published(&api, &roots, &first).await?;

    // As after a restart: a new pod, an empty directory.
    fs::create_dir(&second_dir)?;
    let second = CaProcess::start(&api, "second", &second_dir, &flags).await?;
    for file in CA_FILES {
        ensure!(
            fs::read(second_dir.join(file))? == kept[file].0,
            "{file} is not the Secret's"
        );
    }
    ensure!(fs::read(first_dir.join("root-cert.pem"))? == kept["root-cert.pem"].0);
    let key_mode = fs::metadata(second_dir.join("ca-key.pem"))?
        .permissions()
        .mode();
    ensure!(key_mode & 0o777 == 0o600, "the key's mode is {key_mode:o}");

    // Its serving certificate and what it signs chain to the kept root.
    let mut client = grpc_client(&second, &roots[0]).await?;
    let response = Ask::impersonating("node1", WEB).send(&mut client).await??;
    check_issued(&response, WEB, &roots, DEFAULT_TTL)?;
    logged(|| second.log(), "restored the root kept in the Secret").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_root_secret_missing_keys_stops_the_start() -> anyhow::Result<()> {
    let api = api_server(INCOMPLETE_SECRET).await?;
    let dir = api.path("cacerts");
    fs::create_dir(&dir)?;
    let flags = [
        &["--create-root", "--root-secret", ROOT_SECRET][..],
        &PUBLISH,
    ]
    .concat();
    let mut ca = CaProcess::spawn(&api, "ca", &dir, &flags)?;
    let status = ca.wait_exit().await?;
    ensure!(!status.success(), "ambit ca exited with {status}");
    let log = ca.log();
    ensure!(
        log.contains("Secret ambit-system/cacerts lacks") && log.contains("ca-key.pem"),
        "{log}"
    );
    ensure!(is_empty(&dir)?, "a root was written or created anyway");
    Ok(())
}

fn is_empty(dir: &Path) -> anyhow::Result<bool> {
    Ok(fs::read_dir(dir)?.next().is_none())
}
