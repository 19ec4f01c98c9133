//! Istio's `ServiceEntry` (`networking.istio.io/v1`), read for egress and DNS: its hosts,
//! addresses, ports, resolution, endpoints and `exportTo`. One that does not read is reported and
//! left out, which under `REGISTRY_ONLY` refuses what it would have allowed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use super::{Describe, ObjectError, Sourced};
use crate::egress::{HostPattern, Resolution, ServiceEntry};
use crate::policy::compile::cidr;

#[derive(Debug, Deserialize)]
struct Model {
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<Port>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Port {
    number: u32,
}

#[derive(Debug, Deserialize)]
struct WorkloadEntry {
    address: String,
    /// Read only to refuse entries whose endpoints remap ports: their traffic would need a
    /// translation the agent does not make.
    #[serde(default)]
    ports: BTreeMap<String, u32>,
}

/// The entry `value` describes, or what is wrong with it.
pub(super) fn service_entry(entry: &Sourced<Value>) -> Result<ServiceEntry, ObjectError> {
    let value = &*entry.object;
    let metadata = |field: &str| value.get("metadata")?.get(field)?.as_str();
    let object = Describe {
        origin: entry.origin,
        kind: "ServiceEntry",
        namespace: metadata("namespace"),
        name: metadata("name"),
    }
    .to_string();
    let error = |field: &str, message: String| ObjectError {
        object: object.clone(),
        field: field.to_owned(),
        message,
    };
    let model: Model = serde_path_to_error::deserialize(value)
        .map_err(|e| error(&e.path().to_string(), e.into_inner().to_string()))?;
    let Model { metadata, spec } = model;
    if spec.hosts.is_empty() {
        return Err(error("spec.hosts", "at least one host is required".into()));
    }
    let hosts = spec
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| HostPattern::parse(h).map_err(|m| error(&format!("spec.hosts[{i}]"), m)))
        .collect::<Result<_, _>>()?;
    let addresses = spec
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| cidr(a).map_err(|m| error(&format!("spec.addresses[{i}]"), m)))
        .collect::<Result<_, _>>()?;
    let ports = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(p.number)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| {
                    error(
                        &format!("spec.ports[{i}].number"),
                        format!("{} is not a port", p.number),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL" | "MESH_INTERNAL") => {}
        Some(other) => {
            return Err(error(
                "spec.location",
                format!("unknown location {other:?}"),
            ));
        }
    }
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS" | "DNS_ROUND_ROBIN") => Resolution::Dns,
        Some(other) => {
            return Err(error(
                "spec.resolution",
                format!("unknown resolution {other:?}"),
            ));
        }
    };
    let mut endpoints = Vec::new();
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        if !endpoint.ports.is_empty() {
            let field = format!("spec.endpoints[{i}].ports");
            return Err(error(
                &field,
                "remapping an endpoint's ports is not supported".into(),
            ));
        }
        let ip: IpAddr = endpoint.address.parse().map_err(|_| {
            let field = format!("spec.endpoints[{i}].address");
            error(
                &field,
                format!(
                    "{:?} is not an IP address (names and Unix sockets are not supported)",
                    endpoint.address
                ),
            )
        })?;
        endpoints.push(ip);
    }
    if resolution == Resolution::Static && endpoints.is_empty() {
        return Err(error(
            "spec.endpoints",
            "resolution STATIC needs endpoints".into(),
        ));
    }
    let export_to = if spec.export_to.is_empty() || spec.export_to.iter().any(|n| n == "*") {
        None
    } else {
        let own = |n: &String| {
            if n == "." {
                metadata.namespace.clone()
            } else {
                n.clone()
            }
        };
        Some(spec.export_to.iter().map(own).collect())
    };
    Ok(ServiceEntry {
        name: metadata.name,
        namespace: metadata.namespace,
        hosts,
        addresses,
        ports,
        resolution,
        endpoints,
        export_to,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::translate::Origin;

    fn read(spec: &str) -> Result<ServiceEntry, String> {
        let yaml = format!("metadata: {{name: api, namespace: shop}}\nspec: {spec}");
        let value: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let sourced = Sourced {
            origin: Origin::Document(1),
            object: Arc::new(value),
        };
        service_entry(&sourced).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_hosts_ports_resolution_and_visibility() {
        let entry = read(
            "{hosts: [API.example.com], ports: [{number: 443, name: https}], resolution: DNS, exportTo: ['.', ops]}",
        )
        .unwrap();
        assert_eq!(entry.hosts, [HostPattern::Exact("api.example.com".into())]);
        assert_eq!(entry.ports, [443]);
        assert_eq!(entry.resolution, Resolution::Dns);
        assert_eq!(entry.export_to, Some(vec!["shop".into(), "ops".into()]));
        assert!(
            read("{hosts: [a.example], exportTo: ['*']}")
                .unwrap()
                .export_to
                .is_none()
        );
    }

    #[test]
    fn says_what_is_wrong() {
        for (spec, expected) in [
            ("{hosts: []}", "`spec.hosts`: at least one host is required"),
            (
                "{hosts: ['*']}",
                "`spec.hosts[0]`: \"*\" is not a host name",
            ),
            (
                "{hosts: [a], ports: [{number: 70000}]}",
                "`spec.ports[0].number`: 70000 is not a port",
            ),
            (
                "{hosts: [a], resolution: DYNAMIC_DNS}",
                "unknown resolution \"DYNAMIC_DNS\"",
            ),
            (
                "{hosts: [a], resolution: STATIC}",
                "resolution STATIC needs endpoints",
            ),
            (
                "{hosts: [a], addresses: [10.0.0.0/33]}",
                "spec.addresses[0]",
            ),
            (
                "{hosts: [a], resolution: STATIC, endpoints: [{address: db.example}]}",
                "is not an IP address",
            ),
            ("{hosts: [a], location: SOMEWHERE}", "unknown location"),
        ] {
            let error = read(spec).unwrap_err();
            assert!(error.contains(expected), "{spec}: {error}");
        }
    }
}
