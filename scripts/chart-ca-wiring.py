"""Checks how a render of the chart wires the agents to their CA; scripts/validate-chart runs it on
every render, with the PyYAML of its kubernetes-validate virtualenv.

    chart-ca-wiring.py RENDER.yaml [ca|external] [pdb|no-pdb]

The agents (the DaemonSet) hold no Secret and no --ca-dir: they reach a CA at --ca-addr with a token
projected for the CA's audience, and authenticate it with the root-cert.pem of a ConfigMap that the
chart never renders. With ambit's CA (`ca`), the chart's Deployment runs `ambit ca` behind the Service
--ca-addr names, with the Secret (or, with --create-root, an emptyDir and the Secret that keeps the
root, --root-secret), serving the name the agents verify, trusting the agents' service account as node
agents, for the audience, trust domain and cluster of the agents, and publishing its roots in the
agents' ConfigMap (--root-configmap) of its own namespace (AMBIT_CA_NAMESPACE, from the downward API).
Its namespaced Role grants exactly what that takes: create ConfigMaps, get and patch that one; with
--root-secret, create Secrets and get that one. The last argument says whether the render holds a
PodDisruptionBudget.
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


def bound_roles(objects, binding_kind, role_kind, namespace, account):
    """The roles of `role_kind` that bindings of `binding_kind` give `namespace`/`account`."""
    names = set()
    for binding in objects:
        if binding["kind"] != binding_kind:
            continue
        if any(
            s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == namespace
            for s in binding.get("subjects", [])
        ):
            assert binding["roleRef"]["kind"] == role_kind, binding
            names.add(binding["roleRef"]["name"])
    return [
        o for o in objects
        if o["kind"] == role_kind and o["metadata"]["name"] in names
        and (role_kind == "ClusterRole" or o["metadata"]["namespace"] == namespace)
    ]


def cluster_roles_of(objects, namespace, account):
    return bound_roles(objects, "ClusterRoleBinding", "ClusterRole", namespace, account)


def namespaced_grants(objects, namespace, account):
    """(resource, verb, name or None) of the core group that Roles grant the account."""
    grants = set()
    for role in bound_roles(objects, "RoleBinding", "Role", namespace, account):
        for rule in role.get("rules", []):
            assert rule["apiGroups"] == [""], rule
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        grants.add((resource, verb, name))
    return grants


def main(render, mode, pdb):
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
    rendered = [c["metadata"]["name"] for c in of_kind("ConfigMap")]
    assert root_volume["name"] not in rendered, f"the chart renders ConfigMap {root_volume['name']}"

    address = urlsplit(agent_flags["--ca-addr"])
    assert address.scheme == "https" and address.port, agent_flags["--ca-addr"]

    deployments = [
        d for d in of_kind("Deployment") if container_running(d["spec"]["template"]["spec"], "ca")
    ]
    assert bool(of_kind("PodDisruptionBudget")) == (pdb == "pdb"), pdb
    if mode == "external":
        assert not deployments, "ambit's CA is rendered beside an external one"
        assert not of_kind("Service"), "a Service without ambit's CA"
        assert not of_kind("Role"), "a Role without ambit's CA"
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

    ca_container = container_running(ca_pod, "ca")
    assert ca_flags["--root-configmap"] == root_volume["name"], ca_flags["--root-configmap"]
    [ca_namespace] = [e for e in ca_container["env"] if e["name"] == "AMBIT_CA_NAMESPACE"]
    assert ca_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", ca_namespace
    [cacerts] = [v for v in ca_pod["volumes"] if v["name"] == "cacerts"]
    root_secret = ca_flags.get("--root-secret")
    if ca_flags.get("--create-root"):
        assert "emptyDir" in cacerts and root_secret, (cacerts, root_secret)
        assert not secret_volumes(ca_pod), secret_volumes(ca_pod)
    else:
        assert "secret" in cacerts and not root_secret, (cacerts, root_secret)

    ca_account = ca_pod["serviceAccountName"]
    expected = {("configmaps", "create", None)}
    expected |= {("configmaps", verb, root_volume["name"]) for verb in ["get", "patch"]}
    if root_secret:
        expected |= {("secrets", "create", None), ("secrets", "get", root_secret)}
    granted = namespaced_grants(objects, namespace, ca_account)
    assert granted == expected, f"the CA's Role grants {sorted(granted, key=str)}"
    for role in cluster_roles_of(objects, namespace, ca_account):
        for rule in role.get("rules", []):
            assert not {"configmaps", "secrets"} & set(rule.get("resources", [])), role
    if pdb == "pdb":
        [budget] = of_kind("PodDisruptionBudget")
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except (AssertionError, KeyError, ValueError) as error:
        sys.exit(f"chart-ca-wiring: {sys.argv[1]} ({' '.join(sys.argv[2:])}): {error!r}")
