"""Checks how a render of the chart wires the agents to their CA; scripts/validate-chart runs it on
every render, with the PyYAML of its kubernetes-validate virtualenv.

    chart-ca-wiring.py RENDER.yaml [ca|external] [root-configmap|no-root-configmap] [pdb|no-pdb]

The agents (the DaemonSet) hold no Secret and no --ca-dir: they reach a CA at --ca-addr with a token
projected for the CA's audience, and authenticate it with the root-cert.pem of a ConfigMap. With
ambit's CA (`ca`), the chart's Deployment runs `ambit ca` behind the Service --ca-addr names, with
the Secret, serving the name the agents verify, trusting the agents' service account as node
agents, for the audience, trust domain and cluster of the agents. The other arguments say whether
the render holds the root's ConfigMap and a PodDisruptionBudget.
"""

import sys
from urllib.parse import urlsplit

import yaml

TOKEN_AUDIENCE_LIFETIME = 43200


def flags(container):
    """The container's `--flag value` pairs (a flag without a value maps to True)."""
    args = container.get("args", [])
    found, index = {}, 1
    while index < len(args):
        flag = args[index]
        value = args[index + 1] if index + 1 < len(args) else None
        if value is None or value.startswith("--"):
            found[flag] = True
            index += 1
        else:
            found[flag] = value
            index += 2
    return found


def container_running(pod, command):
    for container in pod["containers"]:
        if container.get("args", [None])[0] == command:
            return container
    return None


def secret_volumes(pod):
    names = []
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.append(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.append(source["secret"]["name"])
    return names


def volume_at(pod, container, path):
    """The volume mounted at the directory of `path`."""
    directory = path.rsplit("/", 1)[0]
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"].rstrip("/") == directory:
            for volume in pod.get("volumes", []):
                if volume["name"] == mount["name"]:
                    return volume
    raise AssertionError(f"nothing is mounted at {directory} for {path}")


def main(render, mode, root, pdb):
    with open(render) as file:
        objects = [o for o in yaml.safe_load_all(file) if o]
    of_kind = lambda kind: [o for o in objects if o["kind"] == kind]

    [daemonset] = of_kind("DaemonSet")
    agent_pod = daemonset["spec"]["template"]["spec"]
    agent = container_running(agent_pod, "agent")
    agent_flags = flags(agent)
    namespace = daemonset["metadata"]["namespace"]

    assert "--ca-dir" not in agent_flags, "the agent signs with a CA key of its own (--ca-dir)"
    assert not secret_volumes(agent_pod), f"the agents' pods mount Secrets {secret_volumes(agent_pod)}"

    token = volume_at(agent_pod, agent, agent_flags["--ca-token"])
    [source] = token["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == agent_flags["--ca-token"].rsplit("/", 1)[1], token
    assert token["expirationSeconds"] == TOKEN_AUDIENCE_LIFETIME, token

    root_volume = volume_at(agent_pod, agent, agent_flags["--ca-root"])["configMap"]
    assert root_volume["items"] == [{"key": "root-cert.pem", "path": "root-cert.pem"}], root_volume
    root_maps = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == root_volume["name"]]
    assert bool(root_maps) == (root == "root-configmap"), f"ConfigMap {root_volume['name']}: {root}"
    for root_map in root_maps:
        assert root_map["data"]["root-cert.pem"].startswith("-----BEGIN CERTIFICATE-----\n")
        assert root_map["data"]["root-cert.pem"].endswith("-----END CERTIFICATE-----\n")

    address = urlsplit(agent_flags["--ca-addr"])
    assert address.scheme == "https" and address.port, agent_flags["--ca-addr"]

    deployments = [
        d for d in of_kind("Deployment") if container_running(d["spec"]["template"]["spec"], "ca")
    ]
    assert bool(of_kind("PodDisruptionBudget")) == (pdb == "pdb"), pdb
    if mode == "external":
        assert not deployments, "ambit's CA is rendered beside an external one"
        assert not of_kind("Service"), "a Service without ambit's CA"
        return

    [deployment] = deployments
    ca_pod = deployment["spec"]["template"]["spec"]
    ca_flags = flags(container_running(ca_pod, "ca"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    agent_selector = daemonset["spec"]["selector"]["matchLabels"]
    assert not agent_selector.items() <= labels.items(), "the agents' selector matches the CA's pods"

    [service] = [s for s in of_kind("Service") if s["spec"]["selector"].items() <= labels.items()]
    assert address.hostname == f"{service['metadata']['name']}.{namespace}.svc", address
    assert address.port in [p["port"] for p in service["spec"]["ports"]], address
    assert address.hostname in ca_flags["--server-names"].split(","), ca_flags["--server-names"]
    account = f"{namespace}/{agent_pod['serviceAccountName']}"
    assert ca_flags["--trusted-node-accounts"] == account, ca_flags["--trusted-node-accounts"]
    assert ca_flags["--audience"] == token["audience"], (ca_flags["--audience"], token)
    for flag in ["--trust-domain", "--cluster-id"]:
        assert ca_flags[flag] == agent_flags[flag], flag
    assert ca_pod["serviceAccountName"] != agent_pod["serviceAccountName"]

    [cacerts] = [v for v in ca_pod["volumes"] if v["name"] == "cacerts"]
    if ca_flags.get("--create-root"):
        assert "emptyDir" in cacerts and deployment["spec"]["replicas"] == 1, cacerts
    else:
        assert "secret" in cacerts, cacerts
    if pdb == "pdb":
        [budget] = of_kind("PodDisruptionBudget")
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except (AssertionError, KeyError, ValueError) as error:
        sys.exit(f"chart-ca-wiring: {sys.argv[1]} ({' '.join(sys.argv[2:])}): {error!r}")
