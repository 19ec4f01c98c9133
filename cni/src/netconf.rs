//! The network configuration on stdin: the standard keys, `prevResult`, and ambit's own keys
//! `agentSocket`, `timeoutSeconds`, `kubeconfig` and `logFile`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::protocol::DEFAULT_AGENT_SOCKET;

/// The CNI versions whose configuration and results this plugin reads and writes.
pub(crate) const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long the agent may take by default: it answers an ADD only once capture is in place.
const DEFAULT_TIMEOUT_SECONDS: u64 = 30;

/// Why the network configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetconfError {
    #[error("the network configuration is not valid JSON of the expected shape")]
    Decode(#[source] serde_json::Error),
    #[error("cniVersion {0:?} is not supported (supported: {SUPPORTED_VERSIONS:?})")]
    UnsupportedVersion(String),
    #[error("timeoutSeconds must be at least 1")]
    ZeroTimeout,
    #[error("prevResult.ips[{index}].address {address:?} is not an address in CIDR form")]
    BadAddress { index: usize, address: String },
    #[error("prevResult.ips is not a list of objects with an address")]
    BadIps,
}

/// The configuration as given on stdin; unknown keys are other plugins' business and ignored.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct RawNetconf {
    cni_version: String,
    prev_result: Option<Map<String, Value>>,
    agent_socket: Option<PathBuf>,
    timeout_seconds: Option<u64>,
    kubeconfig: Option<PathBuf>,
    log_file: Option<PathBuf>,
}

/// The validated configuration, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Netconf {
    pub(crate) cni_version: String,
    /// The result of the plugins before this one in the chain, passed on unchanged.
    pub(crate) prev_result: Option<Map<String, Value>>,
    pub(crate) agent_socket: PathBuf,
    /// The whole time the agent may take: connect, request and reply.
    pub(crate) timeout: Duration,
    /// A kubeconfig to ask the API server whether a pod is in the mesh when the agent is down.
    pub(crate) kubeconfig: Option<PathBuf>,
    pub(crate) log_file: Option<PathBuf>,
}

impl Netconf {
    pub(crate) fn parse(text: &[u8]) -> Result<Self, NetconfError> {
        let raw: RawNetconf = serde_json::from_slice(text).map_err(NetconfError::Decode)?;
        if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
            return Err(NetconfError::UnsupportedVersion(raw.cni_version));
        }
        let timeout_seconds = raw.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        if timeout_seconds == 0 {
            return Err(NetconfError::ZeroTimeout);
        }
        Ok(Self {
            cni_version: raw.cni_version,
            prev_result: raw.prev_result,
            agent_socket: raw
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
            timeout: Duration::from_secs(timeout_seconds),
            kubeconfig: raw.kubeconfig,
            log_file: raw.log_file,
        })
    }

    /// The addresses in `prevResult.ips[].address` (`10.0.0.5/24` → `10.0.0.5`); none without
    /// a `prevResult`. The 0.3, 0.4 and 1.x results share this shape.
    pub(crate) fn pod_ips(&self) -> Result<Vec<IpAddr>, NetconfError> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|result| result.get("ips"))
        else {
            return Ok(Vec::new());
        };
        let ips = ips.as_array().ok_or(NetconfError::BadIps)?;
        ips.iter()
            .enumerate()
            .map(|(index, ip)| {
                let address = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or(NetconfError::BadIps)?;
                parse_cidr_address(address).ok_or_else(|| NetconfError::BadAddress {
                    index,
                    address: address.to_owned(),
                })
            })
            .collect()
    }

    /// `prevResult` as this plugin's result: unchanged but for `cniVersion`, which is the
    /// configuration's.
    pub(crate) fn result(&self) -> Option<Value> {
        let mut result = self.prev_result.clone()?;
        result.insert(
            "cniVersion".to_owned(),
            Value::String(self.cni_version.clone()),
        );
        Some(Value::Object(result))
    }
}

fn parse_cidr_address(cidr: &str) -> Option<IpAddr> {
    let (address, prefix) = cidr.split_once('/')?;
    let address: IpAddr = address.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    (prefix <= bits).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_RESULT: &str = r#"{
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambit-cni",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [
                {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
                {"address": "fd00:10:244:1::7/64", "interface": 0}
            ],
            "dns": {}
        }
    }"#;

    #[test]
    fn defaults() {
        let netconf =
            Netconf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"ambit-cni"}"#).unwrap();
        assert_eq!(netconf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(netconf.timeout, Duration::from_secs(30));
        assert_eq!((netconf.kubeconfig, netconf.log_file), (None, None));
        assert_eq!(netconf.prev_result, None);
    }

    #[test]
    fn own_keys() {
        let netconf = Netconf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"ambit-cni","agentSocket":"/run/a.sock",
                "timeoutSeconds":5,"kubeconfig":"/etc/cni/net.d/ambit-kubeconfig",
                "logFile":"/var/log/ambit-cni.log","capabilities":{"portMappings":true}}"#,
        )
        .unwrap();
        assert_eq!(netconf.agent_socket, PathBuf::from("/run/a.sock"));
        assert_eq!(netconf.timeout, Duration::from_secs(5));
        assert!(netconf.kubeconfig.is_some() && netconf.log_file.is_some());
    }

    #[test]
    fn refuses_bad_configurations() {
        assert!(matches!(
            Netconf::parse(b"{not json"),
            Err(NetconfError::Decode(_))
        ));
        assert!(matches!(
            Netconf::parse(br#"{"cniVersion":"0.2.0"}"#),
            Err(NetconfError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            Netconf::parse(br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#),
            Err(NetconfError::ZeroTimeout)
        ));
    }

    #[test]
    fn pod_ips_from_a_1_0_result() {
        let netconf = Netconf::parse(V1_RESULT.as_bytes()).unwrap();
        assert_eq!(
            netconf.pod_ips().unwrap(),
            vec![
                "10.244.1.7".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn pod_ips_from_a_0_4_result() {
        let netconf = Netconf::parse(
            br#"{"cniVersion":"0.4.0","prevResult":{"cniVersion":"0.4.0",
                "ips":[{"version":"4","address":"10.1.0.9/16","gateway":"10.1.0.1"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            netconf.pod_ips().unwrap(),
            vec!["10.1.0.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn refuses_addresses_that_are_not_cidr() {
        for address in ["10.1.0.9", "10.1.0.9/33", "pod/24", "fd00::1/129"] {
            let netconf = Netconf::parse(
                format!(
                    r#"{{"cniVersion":"1.0.0","prevResult":{{"ips":[{{"address":"{address}"}}]}}}}"#
                )
                .as_bytes(),
            )
            .unwrap();
            assert!(
                matches!(
                    netconf.pod_ips(),
                    Err(NetconfError::BadAddress { index: 0, .. })
                ),
                "{address}"
            );
        }
    }

    #[test]
    fn the_result_is_prev_result_in_the_configuration_version() {
        let mut netconf = Netconf::parse(V1_RESULT.as_bytes()).unwrap();
        netconf.cni_version = "1.1.0".to_owned();
        let result = netconf.result().unwrap();
        assert_eq!(result["cniVersion"], "1.1.0");
        assert_eq!(result["ips"][0]["address"], "10.244.1.7/24");
        assert_eq!(result["interfaces"][0]["name"], "eth0");
    }
}
