//! DNS for the lab: a real upstream server (the system's `dnsmasq`, Debian's package) on a host
//! outside the cluster, authoritative for the names a test gives it; and a client that asks
//! questions from inside a pod, as its resolver would, over UDP or TCP.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ambit_agent::lab::topology::{ExternalHost, Topology};
use ambit_agent::lab::{Cluster, InPod};
use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// How long dnsmasq may take to answer its first query.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a query may wait for its answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `dnsmasq` on an external host's main address: it answers the names it was given (TTL 60 s),
/// NXDOMAIN for any other name under `cluster.local` (as the cluster's DNS would), and REFUSED
/// for the rest. Killed when dropped.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    _hosts: tempfile::NamedTempFile,
}

impl Dnsmasq {
    /// Serves `records` (a name may have several addresses, and each has a TXT record
    /// `ambit-test`) from `host`, on `port` (53 for the agents, which forward there).
    pub async fn start(
        host: &ExternalHost,
        port: u16,
        records: &[(&str, IpAddr)],
    ) -> anyhow::Result<Self> {
        let mut hosts = tempfile::NamedTempFile::new().context("a hosts file for dnsmasq")?;
        for (name, ip) in records {
            writeln!(hosts, "{ip} {name}")?;
        }
        let ip = host.ips[0];
        let child = Topology::command_in(&host.netns, "dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--local-ttl=60",
                "--local=/cluster.local/",
                "--pid-file=",
                "--user=root",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.path().display()))
            .args(
                records
                    .iter()
                    .map(|(name, _)| format!("--txt-record={name},ambit-test")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start dnsmasq (install it: scripts/install-deps)")?;
        let server = Self {
            child,
            addr: SocketAddr::new(IpAddr::V4(ip), port),
            _hosts: hosts,
        };
        let host_ns = InPod::open(&host.netns_path())?;
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = records
            .first()
            .map_or("probe.cluster.local", |(name, _)| *name);
        while ask(&host_ns, server.addr, probe, RecordType::A, false)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq did not answer on {} within {START_TIMEOUT:?}",
                    server.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// Restarts every agent of `cluster` with `args` and this server as its upstream
    /// (`--dns-upstream`, a resolv.conf, which port 53 is implied in), and writes every pod's
    /// resolv.conf as kubelet would, naming `nameserver`. Returns the agents' resolv.conf, which
    /// must outlive them.
    pub async fn forward_from(
        &self,
        cluster: &mut Cluster,
        nameserver: Ipv4Addr,
        args: &[&str],
    ) -> anyhow::Result<tempfile::NamedTempFile> {
        let upstream = tempfile::NamedTempFile::new()?;
        std::fs::write(upstream.path(), format!("nameserver {}\n", self.addr.ip()))?;
        for pod in cluster.topology().pods() {
            let text = pod_resolv_conf(nameserver, &pod.namespace);
            cluster.topology().write_resolv_conf(pod, &text)?;
        }
        let path = upstream.path().to_str().context("a temporary path")?;
        let mut args = args.to_vec();
        args.extend(["--dns-upstream", path]);
        cluster.set_agent_args(&args);
        let nodes: Vec<String> = cluster
            .topology()
            .nodes()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        for node in nodes {
            cluster.kill_agent(&node);
            cluster.start_agent(&node).await?;
        }
        Ok(upstream)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod's resolv.conf, as kubelet writes it for a pod of `namespace`: a nameserver (which
/// capture makes the agent's proxy whatever it is) and the cluster's search path.
fn pod_resolv_conf(nameserver: Ipv4Addr, namespace: &str) -> String {
    format!(
        "nameserver {nameserver}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
}

/// Asks `server` about `name` from inside `pod`, over TCP or UDP, and returns the answer.
pub async fn ask(
    pod: &InPod,
    server: SocketAddr,
    name: &str,
    query_type: RecordType,
    tcp: bool,
) -> anyhow::Result<Message> {
    let mut query = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name)?, query_type));
    let bytes = query.to_vec()?;
    let reply = exchange(pod, server, bytes, tcp).await?;
    let reply = Message::from_vec(&reply).context("the answer is no DNS message")?;
    if reply.metadata.id != query.metadata.id {
        bail!(
            "the answer has id {}, not {}",
            reply.metadata.id,
            query.metadata.id
        );
    }
    Ok(reply)
}

/// Sends `bytes` to `server` from inside `pod` and returns the reply: over UDP, one datagram;
/// over TCP, one length-prefixed message.
pub async fn exchange(
    pod: &InPod,
    server: SocketAddr,
    bytes: Vec<u8>,
    tcp: bool,
) -> anyhow::Result<Vec<u8>> {
    let reply = pod
        .run(move || -> std::io::Result<Vec<u8>> {
            if tcp {
                use std::io::Read as _;
                let mut stream = std::net::TcpStream::connect_timeout(&server, QUERY_TIMEOUT)?;
                stream.set_read_timeout(Some(QUERY_TIMEOUT))?;
                let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
                stream.write_all(&len.to_be_bytes())?;
                stream.write_all(&bytes)?;
                let mut len = [0; 2];
                stream.read_exact(&mut len)?;
                let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut reply)?;
                Ok(reply)
            } else {
                let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
                socket.set_read_timeout(Some(QUERY_TIMEOUT))?;
                socket.connect(server)?;
                socket.send(&bytes)?;
                let mut reply = vec![0; 65535];
                let len = socket.recv(&mut reply)?;
                reply.truncate(len);
                Ok(reply)
            }
        })
        .await??;
    Ok(reply)
}
