//! A cluster: its topology, the file its agents read, and the agents.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::agent::AgentProcess;
use super::waypoint::WaypointProcess;

/// What an agent logs when it has loaded a changed cluster file.
const RELOADED: &str = "configuration reloaded";
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long agents may take to see a change through the API server: longer, as a watch that
/// failed (the server restarted) is retried after a backoff of up to 30 s.
const API_TIMEOUT: Duration = Duration::from_secs(40);
use super::apiserver::{ApiServerProcess, resource_version};
use super::ca::{self, CaProcess};
use super::pod::InPod;
use super::pod_process::{CgroupLayout, PodProcess};
use super::topology::{ExternalHost, PodNs, Topology};
use crate::source::STATE_UPDATED;

/// A waypoint: its pod (named after it, running as the service account of that name, labelled
/// as istiod labels a waypoint's pods) and the Service in front of it.
#[derive(Debug, Clone)]
struct WaypointSpec {
    namespace: String,
    name: String,
    /// `istio.io/waypoint-for`.
    traffic: String,
}

/// Where a node is, as its `topology.kubernetes.io/*` labels say.
#[derive(Debug, Clone)]
struct Locality {
    region: String,
    zone: String,
}

#[derive(Debug, Clone)]
struct PodSpec {
    namespace: String,
    name: String,
    opted_out: bool,
    /// Labels besides `app` and the opt-out.
    labels: BTreeMap<String, String>,
    /// Whether the cluster file gives the pod's IP, as kubelet does once its sandbox is up.
    ip_published: bool,
}

/// What a cluster holds, before it starts.
#[derive(Debug)]
pub struct ClusterBuilder {
    agent_binary: PathBuf,
    nodes: Vec<String>,
    localities: BTreeMap<String, Locality>,
    namespaces: Vec<(String, bool)>,
    pods: Vec<(String, PodSpec)>,
    waypoints: Vec<WaypointSpec>,
    objects: String,
    agent_args: Vec<String>,
    pod_processes: Option<CgroupLayout>,
    apiserver: Option<PathBuf>,
    apiserver_args: Vec<String>,
    istio_crds: bool,
    certificate_authority: bool,
}

impl ClusterBuilder {
    /// More flags for every agent, such as `--baseline-learn 2s`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Agents that read the cluster from an API server, `fake-apiserver` run from `binary`
    /// and serving the cluster file (with Istio's CRDs), in place of the file; pods get
    /// processes in systemd-layout cgroups unless [`pod_processes`](Self::pod_processes) says
    /// otherwise, as the agents find pods by them.
    pub fn kubernetes(mut self, binary: &Path) -> Self {
        self.apiserver = Some(binary.to_owned());
        self.istio_crds = true;
        self.pod_processes.get_or_insert(CgroupLayout::Systemd);
        self
    }

    /// More flags for the API server, such as `--watch-delay-ms 60000`.
    pub fn apiserver_args(mut self, args: &[&str]) -> Self {
        self.apiserver_args
            .extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Agents that get their certificates from `ambit ca` (run from the agent binary), as in
    /// a cluster, in place of a CA key of their own; needs [`kubernetes`](Self::kubernetes),
    /// which reviews the agents' tokens.
    pub fn certificate_authority(mut self) -> Self {
        self.certificate_authority = true;
        self
    }

    /// Leaves Istio's CRDs out of the cluster file, as in a cluster without Istio.
    pub fn without_istio_crds(mut self) -> Self {
        self.istio_crds = false;
        self
    }

    /// Gives every pod, when it is created, a process in a cgroup named after its UID in
    /// `layout`, as kubelet would: what the agent finds pods by in a Kubernetes cluster.
    pub fn pod_processes(mut self, layout: CgroupLayout) -> Self {
        self.pod_processes = Some(layout);
        self
    }

    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }

    /// Lists the Node `node` in the cluster file, labelled as in `region` and `zone`; nodes
    /// are not listed otherwise, as the agents need them only for locality.
    pub fn node_locality(mut self, node: &str, region: &str, zone: &str) -> Self {
        let locality = Locality {
            region: region.to_owned(),
            zone: zone.to_owned(),
        };
        self.localities.insert(node.to_owned(), locality);
        self
    }

    /// A namespace labelled `istio.io/dataplane-mode=ambient`.
    pub fn ambient_namespace(mut self, name: &str) -> Self {
        self.namespaces.push((name.to_owned(), true));
        self
    }

    /// A namespace outside the mesh.
    pub fn namespace(mut self, name: &str) -> Self {
        self.namespaces.push((name.to_owned(), false));
        self
    }

    /// More objects for the cluster file from the start (policies), as YAML documents.
    pub fn objects(mut self, yaml: &str) -> Self {
        self.objects = yaml.to_owned();
        self
    }

    pub fn pod(self, node: &str, namespace: &str, name: &str) -> Self {
        self.with_pod(node, namespace, name, false)
    }

    /// A pod labelled `istio.io/dataplane-mode=none`.
    pub fn opted_out_pod(self, node: &str, namespace: &str, name: &str) -> Self {
        self.with_pod(node, namespace, name, true)
    }

    /// The waypoint `namespace/name`, taking `traffic` (`istio.io/waypoint-for`: `service`,
    /// `workload`, `all`): a pod of that name on `node`, outside capture, running
    /// `ambit waypoint`, and the Service of that name in front of it.
    pub fn waypoint(mut self, node: &str, namespace: &str, name: &str, traffic: &str) -> Self {
        self = self.with_pod(node, namespace, name, true);
        if let Some((_, pod)) = self.pods.last_mut() {
            pod.labels.insert(
                "gateway.networking.k8s.io/gateway-name".to_owned(),
                name.to_owned(),
            );
        }
        self.waypoints.push(WaypointSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            traffic: traffic.to_owned(),
        });
        self
    }

    fn with_pod(mut self, node: &str, namespace: &str, name: &str, opted_out: bool) -> Self {
        let spec = PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            opted_out,
            labels: BTreeMap::new(),
            ip_published: true,
        };
        self.pods.push((node.to_owned(), spec));
        self
    }

    /// Builds the namespaces, writes the cluster file, and starts one ready agent per node.
    pub async fn start(self) -> anyhow::Result<Cluster> {
        if !nix::unistd::geteuid().is_root() {
            return Err(anyhow!("building network namespaces needs root"));
        }
        let mut topology = Topology::new()?;
        for node in &self.nodes {
            topology.add_node(node)?;
        }
        if self.certificate_authority && self.apiserver.is_none() {
            return Err(anyhow!(
                "a certificate authority needs an API server to review tokens"
            ));
        }
        let dir = tempfile::tempdir().context("creating a directory for the cluster's files")?;
        let ca_dir = dir.path().join("ca");
        let trust_domain = "cluster.local".parse()?;
        ambit_identity::LocalCa::load_or_create(&ca_dir, &trust_domain)?;
        let mut cluster = Cluster {
            agent_binary: self.agent_binary,
            config: dir.path().join("cluster.yaml"),
            ca_dir,
            dir,
            localities: self.localities,
            waypoint_specs: self.waypoints,
            waypoints: BTreeMap::new(),
            namespaces: self.namespaces,
            pods: Vec::new(),
            extra: self.objects,
            agent_args: self.agent_args,
            agents: BTreeMap::new(),
            replaced: Vec::new(),
            pod_processes: BTreeMap::new(),
            pod_process_layout: self.pod_processes,
            apiserver: None,
            ca: None,
            agent_pods: if self.certificate_authority {
                self.nodes.clone()
            } else {
                Vec::new()
            },
            istio_crds: self.istio_crds,
            topology,
        };
        for (node, spec) in self.pods {
            cluster.add_pod(&node, spec)?;
        }
        cluster.write_config()?;
        if let Some(binary) = self.apiserver {
            let host = cluster.topology.join_host()?;
            let mut args = self.apiserver_args;
            if self.certificate_authority {
                let tokens = cluster.dir.path().join("tokens.yaml");
                std::fs::write(&tokens, ca::tokens_file(&cluster.agent_pods))
                    .context("writing the tokens file")?;
                args.extend(["--tokens".to_owned(), tokens.display().to_string()]);
            }
            let server =
                ApiServerProcess::start(&binary, &args, host, &cluster.config, cluster.dir.path())
                    .await?;
            if self.certificate_authority {
                let ca = CaProcess::start(
                    &cluster.agent_binary,
                    host,
                    server.kubeconfig(),
                    &cluster.ca_dir,
                    cluster.dir.path().join("ca.log"),
                )
                .await?;
                cluster.ca = Some(ca);
            }
            cluster.apiserver = Some(server);
        }
        for node in self.nodes {
            cluster.start_agent(&node).await?;
        }
        cluster.start_waypoints().await?;
        Ok(cluster)
    }
}

/// A running cluster; dropping it stops the agents and removes every namespace.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: agents and waypoints go before the namespaces they run in.
    agents: BTreeMap<String, AgentProcess>,
    /// Agents that a new one took over from (or stopped), draining until they exit.
    replaced: Vec<AgentProcess>,
    /// Running waypoints, by name.
    waypoints: BTreeMap<String, WaypointProcess>,
    /// What the agents read the cluster from, when not the file.
    apiserver: Option<ApiServerProcess>,
    /// What signs the agents' certificates, when they hold no CA key.
    ca: Option<CaProcess>,
    /// The nodes whose agent pods the cluster file lists, for the CA to check tokens against.
    agent_pods: Vec<String>,
    /// Pods' processes, by pod name.
    pod_processes: BTreeMap<String, PodProcess>,
    topology: Topology,
    agent_binary: PathBuf,
    config: PathBuf,
    ca_dir: PathBuf,
    /// Nodes the cluster file lists, with their locality.
    localities: BTreeMap<String, Locality>,
    /// The waypoints' Services, which the cluster file lists.
    waypoint_specs: Vec<WaypointSpec>,
    namespaces: Vec<(String, bool)>,
    /// Pods with their namespaces, and whether the cluster file lists them.
    pods: Vec<(PodSpec, PodNs, bool)>,
    /// More objects for the cluster file (policies), as YAML documents.
    extra: String,
    agent_args: Vec<String>,
    /// Where pods created from now on get a process, if they do.
    pod_process_layout: Option<CgroupLayout>,
    /// Whether the cluster file defines Istio's CRDs, so that an API server serves policies;
    /// from the start when there is an API server.
    istio_crds: bool,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster whose agents run `agent_binary`.
    pub fn builder(agent_binary: &Path) -> ClusterBuilder {
        ClusterBuilder {
            agent_binary: agent_binary.to_owned(),
            nodes: Vec::new(),
            localities: BTreeMap::new(),
            namespaces: Vec::new(),
            waypoints: Vec::new(),
            pods: Vec::new(),
            objects: String::new(),
            agent_args: Vec::new(),
            pod_processes: None,
            apiserver: None,
            apiserver_args: Vec::new(),
            istio_crds: false,
            certificate_authority: false,
        }
    }

    /// The `cacerts` directory of the cluster's CA: the agents' own, or `ambit ca`'s, which
    /// reloads it when it changes and whose `root-cert.pem` the agents authenticate it by.
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Adds a host outside the cluster, on the underlay; see
    /// [`Topology::add_external_host`].
    pub fn add_external_host(&mut self, name: &str, addresses: u8) -> anyhow::Result<ExternalHost> {
        Ok(self.topology.add_external_host(name, addresses)?)
    }

    pub fn pod(&self, name: &str) -> anyhow::Result<&PodNs> {
        self.pods
            .iter()
            .find(|(spec, _, _)| spec.name == name)
            .map(|(_, pod, _)| pod)
            .ok_or_else(|| anyhow!("no pod {name}"))
    }

    /// Opens the pod's namespace for its apps.
    pub fn in_pod(&self, name: &str) -> anyhow::Result<InPod> {
        Ok(InPod::open(&self.pod(name)?.netns_path())?)
    }

    /// `port` on the pod's IP.
    pub fn addr(&self, pod: &str, port: u16) -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::new(IpAddr::V4(self.pod(pod)?.ip), port))
    }

    /// Creates a pod's namespace; the cluster file lists it from the next
    /// [`write_config`](Self::write_config).
    pub fn add_pod_namespace(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PodNs> {
        self.add_pod(
            node,
            PodSpec {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                opted_out: false,
                labels: BTreeMap::new(),
                ip_published: true,
            },
        )
    }

    /// Creates a pod's namespace as a CNI would, while the runtime creates its sandbox: the
    /// cluster file lists the pod from the next write, without an IP and without a process
    /// (none of its containers runs yet).
    pub fn add_sandbox(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PodNs> {
        let pod = self.topology.add_pod(node, namespace, name)?;
        let spec = PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            opted_out: false,
            labels: BTreeMap::new(),
            ip_published: false,
        };
        self.pods.push((spec, pod.clone(), true));
        Ok(pod)
    }

    fn add_pod(&mut self, node: &str, spec: PodSpec) -> anyhow::Result<PodNs> {
        let pod = self.topology.add_pod(node, &spec.namespace, &spec.name)?;
        let name = spec.name.clone();
        self.pods.push((spec, pod.clone(), true));
        if let Some(layout) = self.pod_process_layout {
            self.start_pod_process(&name, layout)?;
        }
        Ok(pod)
    }

    /// Starts a process of the pod `name` in its namespace and a cgroup named after its UID in
    /// `layout`, in place of the one it had.
    pub fn start_pod_process(&mut self, name: &str, layout: CgroupLayout) -> anyhow::Result<()> {
        let process = self
            .topology
            .start_pod_process(self.pod(name)?, layout)
            .with_context(|| format!("starting a process of the pod {name}"))?;
        self.pod_processes.insert(name.to_owned(), process);
        Ok(())
    }

    /// Stops the process of the pod `name`, as when its containers have ended; its namespace
    /// stays.
    pub fn stop_pod_process(&mut self, name: &str) {
        self.pod_processes.remove(name);
    }

    /// Leaves `name` out of the cluster file from the next write; its namespace stays.
    pub fn unlist_pod(&mut self, name: &str) {
        for (spec, _, listed) in &mut self.pods {
            if spec.name == name {
                *listed = false;
            }
        }
    }

    /// The flags of agents started from now on, in place of the builder's.
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Labels `name` `istio.io/dataplane-mode=none` from the next write.
    pub fn opt_out_pod(&mut self, name: &str) {
        for (spec, _, _) in &mut self.pods {
            if spec.name == name {
                spec.opted_out = true;
            }
        }
    }

    /// Moves `name` to a new address in the same network namespace: the cluster file lists it
    /// there from the next write. Returns the address.
    pub fn readdress_pod(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let address = self.topology.add_pod_address(name)?;
        for (spec, pod, _) in &mut self.pods {
            if spec.name == name {
                pod.ip = address;
            }
        }
        Ok(address)
    }

    /// Labels the namespace `name` `istio.io/dataplane-mode=ambient`, or takes the label off,
    /// from the next write.
    pub fn set_namespace_ambient(&mut self, name: &str, ambient: bool) {
        for (namespace, enrolled) in &mut self.namespaces {
            if namespace == name {
                *enrolled = ambient;
            }
        }
    }

    /// Whether the cluster file defines Istio's CRDs, from the next write.
    pub fn set_istio_crds(&mut self, defined: bool) {
        self.istio_crds = defined;
    }

    /// Labels `name` `key=value` from the next write.
    pub fn set_pod_label(&mut self, name: &str, key: &str, value: &str) {
        for (spec, _, _) in &mut self.pods {
            if spec.name == name {
                spec.labels.insert(key.to_owned(), value.to_owned());
            }
        }
    }

    /// Adds `yaml` (AuthorizationPolicies, PeerAuthentications, ...) to the cluster file from the
    /// next [`write_config`](Self::write_config) on, in place of what was set before.
    pub fn set_extra_objects(&mut self, yaml: &str) {
        self.extra = yaml.to_owned();
    }

    /// Writes the cluster file the agents read, atomically.
    pub fn write_config(&self) -> anyhow::Result<()> {
        let mut yaml = String::new();
        for (node, Locality { region, zone }) in &self.localities {
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels: {{topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}\n"
            );
        }
        for (name, ambient) in &self.namespaces {
            let labels = if *ambient {
                "\n  labels: {istio.io/dataplane-mode: ambient}"
            } else {
                ""
            };
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n"
            );
        }
        for (spec, pod, _) in self.pods.iter().filter(|(_, _, listed)| *listed) {
            let mut labels = format!("{{app: {}", spec.name);
            if spec.opted_out {
                labels.push_str(", istio.io/dataplane-mode: none");
            }
            for (key, value) in &spec.labels {
                let _ = write!(labels, ", {key}: {value:?}");
            }
            labels.push('}');
            let status = if spec.ip_published {
                format!("status:\n  podIP: {}\n", pod.ip)
            } else {
                "status: {phase: Pending}\n".to_owned()
            };
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {uid}\n  labels: {labels}\nspec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers: [{{name: app, image: app}}]\n{status}",
                name = spec.name,
                namespace = spec.namespace,
                uid = pod.uid,
                node = pod.node,
            );
        }
        for waypoint in &self.waypoint_specs {
            let Some((_, pod, _)) = self.pods.iter().find(|(spec, _, _)| {
                spec.name == waypoint.name && spec.namespace == waypoint.namespace
            }) else {
                continue;
            };
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{istio.io/waypoint-for: {traffic}}}\nspec:\n  clusterIP: None\n  ports: [{{name: mesh, port: 15008}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\nports: [{{name: mesh, port: 15008}}]\n",
                name = waypoint.name,
                namespace = waypoint.namespace,
                traffic = waypoint.traffic,
                ip = pod.ip,
            );
        }
        if !self.agent_pods.is_empty() {
            yaml.push_str("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ambit-system}\n");
        }
        for node in &self.agent_pods {
            yaml.push_str(&ca::agent_pod(node));
        }
        if self.istio_crds {
            yaml.push_str(ISTIO_CRDS);
        }
        yaml.push_str(&self.extra);
        let staged = self.dir.path().join("cluster.yaml.new");
        std::fs::write(&staged, yaml).context("writing the cluster file")?;
        std::fs::rename(&staged, &self.config).context("replacing the cluster file")
    }

    /// Writes the cluster file and waits until every agent has loaded it: from the file, or
    /// from the API server once it has served the change. With an API server, agents are known
    /// to have a change by the versions of the objects they received: an object deleted while
    /// a watch relists (after a 410) leaves no version, so wait for changes, not deletions,
    /// there.
    pub async fn apply(&self) -> anyhow::Result<()> {
        if let Some(apiserver) = &self.apiserver {
            let before = apiserver.loads();
            self.write_config()?;
            let version = apiserver.loaded_after(before, RELOAD_TIMEOUT).await?;
            return self.agents_at(version).await;
        }
        let reloads = |log: String| log.matches(RELOADED).count();
        let before: Vec<usize> = self.reader_logs().map(reloads).collect();
        self.write_config()?;
        let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let loaded = self
                .reader_logs()
                .zip(&before)
                .all(|(log, before)| reloads(log) > *before);
            if loaded {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(anyhow!(
            "the agents did not reload the cluster file:\n{}",
            self.logs()
        ))
    }

    /// The logs of what reads the cluster: the agents and the waypoints.
    fn reader_logs(&self) -> impl Iterator<Item = String> {
        let agents = self.agents.values().map(AgentProcess::log);
        agents.chain(self.waypoints.values().map(WaypointProcess::log))
    }

    /// Writes the cluster file and waits until the API server serves it, not for the agents.
    pub async fn publish(&self) -> anyhow::Result<()> {
        let Some(apiserver) = &self.apiserver else {
            return Err(anyhow!("the cluster has no API server"));
        };
        let before = apiserver.loads();
        self.write_config()?;
        apiserver.loaded_after(before, RELOAD_TIMEOUT).await?;
        Ok(())
    }

    /// Waits until every agent has published a state with what the API server served up to
    /// `version`.
    async fn agents_at(&self, version: u64) -> anyhow::Result<()> {
        let seen = |log: String| {
            log.lines()
                .filter(|line| line.contains(STATE_UPDATED))
                .filter_map(resource_version)
                .max()
                .is_some_and(|seen| seen >= version)
        };
        let deadline = tokio::time::Instant::now() + API_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.reader_logs().all(seen) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(anyhow!(
            "the agents did not see version {version} of the cluster:\n{}",
            self.logs()
        ))
    }

    /// Stops the API server, as an outage of the control plane would; agents keep running.
    pub fn stop_apiserver(&mut self) {
        if let Some(apiserver) = &mut self.apiserver {
            apiserver.stop();
        }
    }

    /// Restarts the API server, as a control-plane upgrade would; agents keep running.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        match &mut self.apiserver {
            Some(apiserver) => apiserver.restart().await,
            None => Err(anyhow!("the cluster has no API server")),
        }
    }

    /// Where the agent of `node` answers the CNI plugin, when the cluster has an API server.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("cni-{node}.sock"))
    }

    /// The kubeconfig of the cluster's API server, if it has one.
    pub fn kubeconfig(&self) -> Option<&Path> {
        self.apiserver.as_ref().map(ApiServerProcess::kubeconfig)
    }

    /// Starts the agent of `node` and waits until it is ready.
    pub async fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.launch_agent(node)?;
        match self.agents.get_mut(node) {
            Some(agent) => agent.wait_ready().await,
            None => Err(anyhow!("no agent of {node}")),
        }
    }

    /// Starts the agent of `node`, without waiting for it to be ready.
    pub fn launch_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let agent = self.spawn_agent(node, &[])?;
        self.agents.insert(node.to_owned(), agent);
        Ok(())
    }

    /// Where the agent of `node` answers the next one.
    pub fn handover_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("handover-{node}.sock"))
    }

    /// Starts a new agent of `node` with `--take-over` (and `extra_args`) beside the running
    /// one, and waits until it has taken over, or stopped the old one, and is ready. The old
    /// one drains until it exits ([`replaced_agents`](Self::replaced_agents)).
    pub async fn replace_agent(&mut self, node: &str, extra_args: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["--take-over"];
        args.extend(extra_args);
        let mut agent = self.spawn_agent(node, &args)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Until then, the old agent answers the node's readiness port.
        while !agent.log().contains("took over from the running agent")
            && !agent
                .log()
                .contains("cannot take over from the running agent")
        {
            if Instant::now() > deadline || agent.exited_within(Duration::ZERO).await? {
                return Err(anyhow!(
                    "the new agent of {node} did not take over:\n{}",
                    agent.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(error) = agent.wait_ready().await {
            let old = self.agents.get(node).map(AgentProcess::log);
            return Err(error.context(format!(
                "the agent it replaces:\n{}",
                old.unwrap_or_default()
            )));
        }
        if let Some(old) = self.agents.insert(node.to_owned(), agent) {
            self.replaced.push(old);
        }
        Ok(())
    }

    /// The agents replaced so far, oldest first.
    pub fn replaced_agents(&mut self) -> &mut [AgentProcess] {
        &mut self.replaced
    }

    /// A new agent process for `node`, with the cluster's arguments and `extra_args`, whose
    /// flags replace the cluster's.
    fn spawn_agent(&mut self, node: &str, extra_args: &[&str]) -> anyhow::Result<AgentProcess> {
        let netns = self
            .topology
            .nodes()
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.netns.clone())
            .ok_or_else(|| anyhow!("no node {node}"))?;
        let started = self.replaced.len() + self.agents.len();
        let log = self.dir.path().join(format!("agent-{node}-{started}.log"));
        let mut source = self.source_args();
        source.extend([
            "--handover-socket".into(),
            self.handover_socket(node).into(),
        ]);
        if self.apiserver.is_some() {
            source.extend(["--cni-socket".into(), self.cni_socket(node).into()]);
        }
        let ca = match &self.ca {
            Some(ca) => {
                let token = self.dir.path().join(format!("token-{node}"));
                std::fs::write(&token, ca::agent_token(node)).context("writing a token")?;
                ca.agent_args(&token)
            }
            None => vec!["--ca-dir".into(), self.ca_dir.clone().into()],
        };
        // A flag of `extra_args` replaces the cluster's (`--flag value` pairs).
        let mut args = Vec::new();
        let mut cluster_args = self.agent_args.iter();
        while let Some(arg) = cluster_args.next() {
            if extra_args.contains(&arg.as_str()) {
                cluster_args.next();
            } else {
                args.push(arg.clone());
            }
        }
        args.extend(extra_args.iter().map(|arg| (*arg).to_owned()));
        AgentProcess::start(&self.agent_binary, node, &netns, &source, &ca, &args, log)
    }

    /// Starts every waypoint in its pod, reading the cluster as the agents do.
    async fn start_waypoints(&mut self) -> anyhow::Result<()> {
        if self.ca.is_some() && !self.waypoint_specs.is_empty() {
            return Err(anyhow!(
                "waypoints get their certificates from a CA directory only"
            ));
        }
        for waypoint in self.waypoint_specs.clone() {
            let pod = self.pod(&waypoint.name)?.clone();
            let log = self
                .dir
                .path()
                .join(format!("waypoint-{}.log", waypoint.name));
            let process = WaypointProcess::start(
                &self.agent_binary,
                &pod.netns,
                (&waypoint.namespace, &waypoint.name),
                &self.source_args(),
                &self.ca_dir,
                log,
            )
            .await?;
            self.waypoints.insert(waypoint.name, process);
        }
        Ok(())
    }

    /// The waypoint `name`.
    pub fn waypoint(&self, name: &str) -> Option<&WaypointProcess> {
        self.waypoints.get(name)
    }

    /// Where the agents and waypoints read the cluster from: the API server, or the file.
    fn source_args(&self) -> Vec<OsString> {
        match &self.apiserver {
            Some(apiserver) => vec![
                "--source".into(),
                "kubernetes".into(),
                "--kubeconfig".into(),
                apiserver.kubeconfig().into(),
            ],
            None => vec!["--config".into(), self.config.clone().into()],
        }
    }

    /// Kills the agent of `node` at once, as a crash would.
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(agent) = self.agents.remove(node) {
            agent.kill();
        }
    }

    pub fn agent(&self, node: &str) -> Option<&AgentProcess> {
        self.agents.get(node)
    }

    pub fn agent_mut(&mut self, node: &str) -> Option<&mut AgentProcess> {
        self.agents.get_mut(node)
    }

    /// All agents' logs, and the API server's, for a failing test's message.
    pub fn logs(&self) -> String {
        let replaced = self
            .replaced
            .iter()
            .map(|agent| format!("--- replaced agent {}\n{}", agent.pid(), agent.log()));
        let agents = self
            .agents
            .iter()
            .map(|(node, agent)| format!("--- agent {node}\n{}", agent.log()))
            .chain(replaced);
        let apiserver = self
            .apiserver
            .iter()
            .map(|apiserver| format!("--- API server\n{}", apiserver.log()));
        let ca = self.ca.iter().map(|ca| format!("--- CA\n{}", ca.log()));
        agents.chain(apiserver).chain(ca).collect()
    }
}

/// Istio's CRDs, as much of them as an API server needs to serve AuthorizationPolicies,
/// PeerAuthentications and ServiceEntries.
pub const ISTIO_CRDS: &str = "---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: authorizationpolicies.security.istio.io}
spec:
  group: security.istio.io
  scope: Namespaced
  names: {kind: AuthorizationPolicy, listKind: AuthorizationPolicyList, plural: authorizationpolicies, singular: authorizationpolicy}
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: peerauthentications.security.istio.io}
spec:
  group: security.istio.io
  scope: Namespaced
  names: {kind: PeerAuthentication, listKind: PeerAuthenticationList, plural: peerauthentications, singular: peerauthentication}
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: serviceentries.networking.istio.io}
spec:
  group: networking.istio.io
  scope: Namespaced
  names: {kind: ServiceEntry, listKind: ServiceEntryList, plural: serviceentries, singular: serviceentry}
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
";
