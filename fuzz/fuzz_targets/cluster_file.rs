//! The cluster file: any UTF-8 text through the file source's parse and translation, the
//! compilation of its AuthorizationPolicies and PeerAuthentications, and then the questions the
//! agent asks the resulting state (routing, authorization). Errors are fine, panics are not.

#![no_main]

use std::iter;
use std::net::{IpAddr, SocketAddr};

use ambit_agent::authorize::InboundRequest;
use ambit_agent::fuzzing;
use ambit_agent::state::ClusterState;
use ambit_identity::{Identity, TrustDomain};
use libfuzzer_sys::fuzz_target;

const ROOT_NAMESPACE: &str = "istio-system";
/// Bounds the work per input: the interesting part is the parsing, not large products.
const MAX_WORKLOADS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(state) = fuzzing::cluster_file(text, ROOT_NAMESPACE) {
        route(&state);
        authorize(&state);
    }
});

fn route(state: &ClusterState) {
    let sources: Vec<IpAddr> = state
        .workloads()
        .iter()
        .flat_map(|w| w.ips.clone())
        .collect();
    for service in state.services() {
        for vip in &service.vips {
            for port in &service.ports {
                let destination = SocketAddr::new(*vip, port.port);
                for source in sources.iter().take(4) {
                    let _ = fuzzing::route(state, *source, destination);
                }
                let _ = state.destination_service(destination);
            }
        }
    }
    for workload in state.workloads() {
        let _ = state.enrolled_on(&workload.node);
        for (ip, source) in workload.ips.iter().zip(&sources) {
            let _ = fuzzing::route(state, *source, SocketAddr::new(*ip, 8080));
        }
    }
}

/// Every workload's ports as plaintext and as each workload's identity.
fn authorize(state: &ClusterState) {
    let workloads = state.workloads();
    let Ok(trust_domain) = "cluster.local".parse::<TrustDomain>() else {
        return;
    };
    let identities: Vec<Option<Identity>> = iter::once(None)
        .chain(
            workloads
                .iter()
                .take(MAX_WORKLOADS)
                .map(|w| Identity::new(&trust_domain, &w.namespace, &w.service_account).ok()),
        )
        .collect();
    let ports: Vec<u16> = [80, 8080, 15008]
        .into_iter()
        .chain(
            state
                .services()
                .iter()
                .flat_map(|s| s.ports.iter().map(|p| p.port)),
        )
        .take(8)
        .collect();
    for workload in workloads.iter().take(MAX_WORKLOADS) {
        for ip in &workload.ips {
            for port in &ports {
                for identity in &identities {
                    let request = InboundRequest {
                        source_ip: workload.ips[0],
                        source_identity: identity.clone(),
                        destination: SocketAddr::new(*ip, *port),
                    };
                    let _ = fuzzing::authorize(state, workload, &request);
                }
            }
        }
    }
}
