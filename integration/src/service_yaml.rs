//! A Service and its EndpointSlice as the cluster file lists them, for tests and benchmarks
//! that put Services in front of their pods.

use std::fmt;
use std::net::IpAddr;

/// A Service with one port, 80, to `target` on `backends`, all ready.
#[derive(Debug, Clone, Copy)]
pub struct ServiceYaml<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub vip: &'a str,
    /// `http`, `tcp`: what Istio takes the port's protocol from.
    pub port_name: &'a str,
    pub target: u16,
    pub backends: &'a [IpAddr],
    /// More labels of the Service, as YAML flow entries (`istio.io/use-waypoint: waypoint`).
    pub labels: &'a str,
}

impl fmt::Display for ServiceYaml<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            name,
            namespace,
            vip,
            port_name,
            target,
            labels,
            ..
        } = self;
        let endpoints: Vec<String> = self
            .backends
            .iter()
            .map(|ip| format!("{{addresses: [{ip}], conditions: {{ready: true}}}}"))
            .collect();
        write!(
            f,
            "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{{labels}}}
spec:
  clusterIP: {vip}
  ports: [{{name: {port_name}, port: 80, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{endpoints}]
ports: [{{name: {port_name}, port: {target}}}]
",
            endpoints = endpoints.join(", ")
        )
    }
}
