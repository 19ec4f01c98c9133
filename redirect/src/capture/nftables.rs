//! Capture with nftables: one table owned by ambit in each pod's namespace, always replaced
//! whole in one transaction, so that a pod is never half captured.
//!
//! - Inbound TCP is handed to the agent's transparent listeners with TPROXY: HBONE to 15008,
//!   everything else to 15006. New inbound TCP that no listener takes is dropped: with the agent
//!   down, inbound traffic fails closed.
//! - Outbound TCP is redirected to 15001 (the original destination is kept by conntrack); with
//!   the agent down, nothing listens there and connections are refused.
//! - DNS (UDP and TCP to port 53, whatever the server) is redirected to the DNS proxy on
//!   127.0.0.1:15053; IPv6 DNS, which the proxy does not serve, is dropped.
//! - The agent's own sockets carry [`AGENT_MARK`] and pass untouched; replies to its spoofed
//!   connections are marked [`REPLY_MARK`] through the connection mark and routed back to it.
//! - Kubelet probes (from 169.254.7.127) and loopback traffic are left alone.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::{CaptureBackend, CaptureError, CaptureTarget, NetSysctls};
use crate::routing::{self, Steering};
use crate::{
    AGENT_MARK, CAPTURED_DNS_PORT, CAPTURED_MARK, DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    KUBELET_PROBE_SOURCE, MARK_MASK, OUTBOUND_PORT, REPLY_MARK,
};

/// The table ambit owns in each pod's namespace.
const TABLE: &str = "ambit";

/// The nftables capture backend. Needs the `nft` binary.
#[derive(Debug, Default, Clone)]
pub struct Nftables {
    /// Where undoing an eBPF capture restores the pod's sysctls.
    sysctls: NetSysctls,
}

impl Nftables {
    pub fn new(sysctls: NetSysctls) -> Self {
        Self { sysctls }
    }

    /// The whole table, as `nft -f` reads it.
    pub fn ruleset() -> String {
        let kubelet = Ipv4Addr::from(KUBELET_PROBE_SOURCE);
        let keep = !MARK_MASK;
        let reply = format!("meta mark set meta mark & {keep:#010x} | {REPLY_MARK:#010x}");
        let agent = format!("meta mark & {MARK_MASK:#010x} == {AGENT_MARK:#010x}");
        let not_agent = format!("meta mark & {MARK_MASK:#010x} != {AGENT_MARK:#010x}");
        // Flows that capture handed to the agent go back through TPROXY, which finds their
        // socket, rather than taking the shortcut of established flows: a packet of such a flow
        // with no socket of the agent's (the ACK of a SYN-cookie handshake the agent answered)
        // would otherwise reach an app's listener.
        let captured = format!("ct mark set ct mark & {keep:#010x} | {CAPTURED_MARK:#010x}");
        let not_captured = format!("ct mark & {MARK_MASK:#010x} != {CAPTURED_MARK:#010x}");
        format!(
            r#"table inet {TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    {agent} ct mark set ct mark & {keep:#010x} | {REPLY_MARK:#010x}
    iifname "lo" accept
    meta l4proto tcp ip saddr {kubelet} accept
    meta l4proto tcp ct state established,related {not_captured} accept
    meta l4proto tcp tcp dport {HBONE_PORT} {not_agent} meta nfproto ipv4 {reply} {captured} tproxy ip to :{HBONE_PORT} accept
    meta l4proto tcp {not_agent} meta nfproto ipv4 {reply} {captured} tproxy ip to :{INBOUND_PLAINTEXT_PORT} accept
    meta l4proto tcp {not_agent} drop
  }}
  chain output_route {{
    type route hook output priority mangle; policy accept;
    ct mark & {MARK_MASK:#010x} == {REPLY_MARK:#010x} meta mark set ct mark
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta l4proto tcp {agent} accept
    meta l4proto tcp meta mark & {MARK_MASK:#010x} == {REPLY_MARK:#010x} accept
    meta l4proto tcp ip daddr {kubelet} accept
    oifname "lo" accept
    meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport {CAPTURED_DNS_PORT} {not_agent} redirect to :{DNS_PORT}
    meta nfproto ipv6 meta l4proto {{ tcp, udp }} th dport {CAPTURED_DNS_PORT} {not_agent} drop
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
}}
"#
        )
    }

    /// Declaring the table before deleting it makes the deletion valid whether or not the table
    /// exists, so enable and disable are each one idempotent transaction.
    fn replace_script(ruleset: &str) -> String {
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{ruleset}")
    }
}

impl CaptureBackend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Make-before-break: the table goes in first, so that the pod's TCP is redirected before an
    /// eBPF capture's routing is replaced, and its filters go last.
    fn enable(&self, _: &CaptureTarget) -> Result<(), CaptureError> {
        nft(&Self::replace_script(&Self::ruleset()))?;
        routing::install(Steering::Marked).map_err(CaptureError::Routing)?;
        super::ebpf::detach_filters(&self.sysctls)
    }

    fn disable(&self) -> Result<(), CaptureError> {
        super::remove_all(&self.sysctls)
    }
}

/// Whether the calling thread's namespace has ambit's table; `false` without `nft`.
pub(super) fn table_exists() -> Result<bool, CaptureError> {
    let listed = Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match listed {
        Ok(status) => Ok(status.success()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(CaptureError::RunNft(error)),
    }
}

/// Deletes ambit's table, if there is one.
pub(super) fn remove_table() -> Result<(), CaptureError> {
    if table_exists()? {
        nft(&Nftables::replace_script(""))?;
    }
    Ok(())
}

/// Runs `nft -f -` with `script` in the calling thread's namespace.
fn nft(script: &str) -> Result<(), CaptureError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::RunNft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(CaptureError::RunNft)?;
    }
    let output = child.wait_with_output().map_err(CaptureError::RunNft)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Nft(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_steers_to_the_agent_ports_and_spares_its_own_traffic() {
        let rules = Nftables::ruleset();
        assert!(rules.contains("tcp dport 15008 meta mark & 0x00000fff != 0x00000539"));
        assert!(rules.contains("tproxy ip to :15008 accept"));
        assert!(rules.contains("tproxy ip to :15006 accept"));
        assert!(rules.contains("redirect to :15001"));
        assert!(rules.contains(
            "meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 meta mark & 0x00000fff != 0x00000539 redirect to :15053"
        ));
        assert!(rules.contains("meta l4proto tcp meta mark & 0x00000fff == 0x00000539 accept"));
        assert!(rules.contains("ip saddr 169.254.7.127 accept"));
    }

    #[test]
    fn inbound_without_a_listener_is_dropped_not_delivered() {
        let rules = Nftables::ruleset();
        let tproxy = rules.find("tproxy ip to :15006").unwrap();
        let drop = rules.find("!= 0x00000539 drop").unwrap();
        assert!(drop > tproxy, "the drop must follow the TPROXY rules");
    }

    #[test]
    fn enable_replaces_the_table_in_one_script() {
        let script = Nftables::replace_script(&Nftables::ruleset());
        assert!(
            script.starts_with("table inet ambit {}\ndelete table inet ambit\ntable inet ambit {")
        );
        assert_eq!(script.matches("delete table").count(), 1);
    }
}
