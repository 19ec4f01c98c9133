//! `ambit ca` as a process against the fake API server (`ambit_integration::CaHarness`): which
//! caller gets which certificate, with which gRPC code it is refused otherwise, the counts on
//! its metrics port, a new root in its CA directory taken up without a restart, the agent's
//! client (`ambit_ca::client`) reading its answers, and the roots published for the agents and
//! a created root kept in a Secret (`roots`). Needs no root.
//!
//! The cluster: node agents `ambit-node1` and `ambit-node2` (`ambit-system/ambit`), the
//! workload `web` (`shop/web`) on node1 and `db` (`shop/db`) on node2.

mod harness;
mod roots;

use std::time::{Duration, Instant};

use ambit_integration::{CaProcess, TestCa, logged};
use anyhow::{bail, ensure};
use tonic::Code;

use harness::{Ask, check_issued, grpc_client, start_ca};

pub(crate) const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
/// The namespace of a static pod of node1: a node can declare one anywhere, so it makes no
/// identity of that namespace the node's.
const PAYMENTS_DEFAULT: &str = "spiffe://cluster.local/ns/payments/sa/default";
pub(crate) const DEFAULT_TTL: Duration = CaProcess::DEFAULT_TTL;
const MAX_TTL: Duration = CaProcess::MAX_TTL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_gets_the_identity_of_a_pod_on_its_node() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = start_ca(&ca).await?;
    let mut client = grpc_client(harness.ca(), ca.root()).await?;
    let roots = [ca.root().clone()];

    let response = Ask::impersonating("node1", WEB).send(&mut client).await??;
    ensure!(response.cert_chain.len() == 3, "leaf, intermediate, root");
    check_issued(&response, WEB, &roots, DEFAULT_TTL)?;

    let long = Ask {
        validity_seconds: 3 * 3600,
        ..Ask::impersonating("node1", WEB)
    };
    let response = long.send(&mut client).await??;
    check_issued(&response, WEB, &roots, MAX_TTL)?;

    let short = Ask {
        validity_seconds: 600,
        ..Ask::impersonating("node1", WEB)
    };
    let response = short.send(&mut client).await??;
    check_issued(&response, WEB, &roots, Duration::from_secs(600))?;

    ensure!(
        harness.ca().count("OK", "issued").await? == 3,
        "{}",
        harness.ca().scrape().await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_for_node_agents_and_the_pods_on_their_node() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = start_ca(&ca).await?;
    let mut client = grpc_client(harness.ca(), ca.root()).await?;

    let elsewhere = Ask::impersonating("node1", DB).refused(&mut client).await?;
    ensure!(
        elsewhere == Code::PermissionDenied,
        "node1 asking for db: {elsewhere:?}"
    );

    let not_a_node = Ask::impersonating("db", WEB).refused(&mut client).await?;
    ensure!(
        not_a_node == Code::PermissionDenied,
        "db asking for web: {not_a_node:?}"
    );

    let own = Ask {
        token: Some("web"),
        impersonate: None,
        csr_identity: WEB,
        validity_seconds: 0,
    };
    let response = own.send(&mut client).await??;
    check_issued(&response, WEB, std::slice::from_ref(ca.root()), DEFAULT_TTL)?;
    let workload = Ask::impersonating("web", DB).refused(&mut client).await?;
    ensure!(
        workload == Code::PermissionDenied,
        "web asking for db: {workload:?}"
    );

    let declared_by_the_node = Ask::impersonating("node1", PAYMENTS_DEFAULT)
        .refused(&mut client)
        .await?;
    ensure!(
        declared_by_the_node == Code::PermissionDenied,
        "node1 asking for the account of its static pod: {declared_by_the_node:?}"
    );

    let stale = Ask::impersonating("node1-of-a-deleted-pod", WEB)
        .refused(&mut client)
        .await?;
    ensure!(
        stale == Code::PermissionDenied,
        "a token of another pod uid: {stale:?}"
    );

    for (reason, expected) in [
        ("no_pod_on_node", 2),
        ("not_a_node_account", 2),
        ("caller_pod_mismatch", 1),
    ] {
        let counted = harness.ca().count("PermissionDenied", reason).await?;
        ensure!(
            counted == expected,
            "{reason}: {counted}\n{}",
            harness.ca().scrape().await?
        );
    }
    ensure!(harness.ca().count("OK", "issued").await? == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_do_not_authenticate_are_refused() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = start_ca(&ca).await?;
    let mut client = grpc_client(harness.ca(), ca.root()).await?;

    for (token, reason) in [
        (Some("node1-expired"), "token_rejected"),
        (Some("node1-for-the-api-server"), "token_rejected"),
        (Some("unknown"), "token_rejected"),
        (None, "missing_token"),
    ] {
        let ask = Ask {
            token,
            ..Ask::impersonating("node1", WEB)
        };
        let code = ask.refused(&mut client).await?;
        ensure!(code == Code::Unauthenticated, "{token:?}: {code:?}");
        ensure!(
            harness.ca().count("Unauthenticated", reason).await? >= 1,
            "{token:?} not counted as {reason}"
        );
    }
    ensure!(
        harness
            .ca()
            .count("Unauthenticated", "token_rejected")
            .await?
            == 3
    );
    logged(|| harness.ca().log(), "token has expired").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_something_else_are_invalid() -> anyhow::Result<()> {
    let ca = TestCa::with_intermediate("cluster")?;
    let harness = start_ca(&ca).await?;
    let mut client = grpc_client(harness.ca(), ca.root()).await?;

    let other_san = Ask {
        csr_identity: DB,
        ..Ask::impersonating("node1", WEB)
    };
    let code = other_san.refused(&mut client).await?;
    ensure!(code == Code::InvalidArgument, "a CSR for db: {code:?}");

    let foreign = Ask::impersonating("node1", "spiffe://other.example/ns/shop/sa/web")
        .refused(&mut client)
        .await?;
    ensure!(
        foreign == Code::InvalidArgument,
        "another trust domain: {foreign:?}"
    );

    ensure!(
        harness
            .ca()
            .count("InvalidArgument", "csr_identity_mismatch")
            .await?
            == 1
    );
    ensure!(
        harness
            .ca()
            .count("InvalidArgument", "foreign_trust_domain")
            .await?
            == 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_in_the_ca_directory_is_signed_with_and_served() -> anyhow::Result<()> {
    let first = TestCa::with_intermediate("first")?;
    let mut harness = start_ca(&first).await?;
    let second = TestCa::root_only("second")?;
    harness.replace_ca(&second)?;

    // The directory is polled every 5 s; the server presents a certificate of the new CA once
    // it reloaded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match grpc_client(harness.ca(), second.root()).await {
            Ok(client) => break client,
            Err(error) if Instant::now() > deadline => {
                bail!(
                    "no certificate of the new root served: {error:#}\n{}",
                    harness.ca().log()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let response = Ask::impersonating("node1", WEB).send(&mut client).await??;
    ensure!(response.cert_chain.len() == 2, "leaf and root");
    check_issued(
        &response,
        WEB,
        std::slice::from_ref(second.root()),
        DEFAULT_TTL,
    )?;
    ensure!(
        grpc_client(harness.ca(), first.root()).await.is_err(),
        "the server still presents a certificate of the old root"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_client_gets_workload_certificates() -> anyhow::Result<()> {
    use ambit_identity::CertificateProvider;

    let ca = TestCa::with_intermediate("cluster")?;
    let harness = start_ca(&ca).await?;
    let client = harness
        .ca()
        .agent_client("node1", &ca, Duration::from_secs(1800))?;

    let web: ambit_identity::Identity = WEB.parse()?;
    let certificate = client.issue(&web).await?;
    ensure!(certificate.identity() == &web);
    let lifetime = certificate.lifetime();
    ensure!(
        lifetime >= Duration::from_secs(1800) && lifetime <= Duration::from_secs(1800 + 120),
        "lives {lifetime:?}"
    );
    ensure!(
        certificate.certified_key().cert.len() == 2,
        "the leaf and the intermediate"
    );

    let db: ambit_identity::Identity = DB.parse()?;
    ensure!(
        client.issue(&db).await.is_err(),
        "a certificate for a pod on another node"
    );
    Ok(())
}
