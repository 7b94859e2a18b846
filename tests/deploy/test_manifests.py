"""The Kubernetes manifests under deploy/: schema-valid, and consistent with what the gateway reads.

Every kustomization is rendered with ``kubectl kustomize`` and every object is validated with
kubernetes-validate in strict mode (unknown fields rejected) against the oldest Kubernetes minor
version the manifests support and the newest one the package knows. The rest checks the
manifests against the code rather than against copies of it: the Role against the API calls of
gateway/discovery/kubernetes.py, env names against the SHARDGATE_* names of the settings model (and
the settings loaded from the manifest's environment), probe paths against the admin routes, the
ConfigMap against ``shardgate validate``, and the example shard groups against the ConfigMap.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import ShardConfig, parse_shard_config
from gateway.discovery.kubernetes import CONFIG_KEY
from gateway.settings import Settings, env_name, load_settings
from tests.deploy.conftest import (
    DEPLOY,
    NAMESPACE,
    REPO_ROOT,
    Manifest,
    Rendered,
    container,
    container_port,
    env_of,
    kustomization_dirs,
    labels_match,
    pod_spec,
    rel,
)

BASE = "deploy/base"
SHARDS = "deploy/examples/shards"
INGRESS = "deploy/examples/ingress"
GATEWAY = "shardgate"  # Deployment, ServiceAccount, Role, traffic Service
METRICS_SERVICE = "shardgate-metrics"
CONFIGMAP = "shardgate-shards"

# Oldest Kubernetes minor version the manifests are written for (matchLabelKeys, nodeTaintsPolicy,
# unhealthyPodEvictionPolicy are all on by default there), and the newest the package knows.
MIN_KUBERNETES = "1.30.0"
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, kubernetes_validate.latest_version()})
# API groups of custom resources (no schema in kubernetes-validate), e.g. the ServiceMonitor and
# PrometheusRule that deploy/monitoring/ is meant to hold.
CUSTOM_RESOURCE_GROUPS = {"monitoring.coreos.com"}

# The client calls gateway/discovery/kubernetes.py may make, and what RBAC each needs.
# Methods of the generated API classes (CoreV1Api, DiscoveryV1Api, ...) that touch a resource.
API_CALL_RE = re.compile(
    r"^(list|read|watch|create|patch|replace|delete|connect)_(namespaced_\w+|\w+_for_all_namespaces)$"
)
# A namespaced list path of the API: /api/v1/... (the core group "") or /apis/GROUP/VERSION/...
API_PATH_RE = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/\{namespace\}/(?P<resource>\w+)$"
)
READ_VERBS = {"get", "list", "watch"}  # the watch loop needs list + watch; get is their read companion
DRAIN_MARGIN_SECONDS = 5  # README "Operations": preStop + drain delay + grace timeout + a margin


# --- helpers -----------------------------------------------------------------------------------


def gateway_deployment(rendered: Rendered) -> Manifest:
    return rendered.one("Deployment", GATEWAY, BASE)


def gateway_env(rendered: Rendered) -> dict[str, str]:
    return env_of(container(gateway_deployment(rendered), GATEWAY))


def shard_config(rendered: Rendered) -> ShardConfig:
    configmap = rendered.one("ConfigMap", CONFIGMAP, BASE)
    return parse_shard_config(configmap["data"][CONFIG_KEY])


def gateway_env_names() -> set[str]:
    """Every SHARDGATE_* variable the gateway reads: one per field of its settings model."""
    return {env_name(field) for field in Settings.model_fields}


def settings_from_env(spec: dict[str, Any]) -> Settings:
    """The settings ``shardgate run`` loads in the container (raises ConfigError on a bad value)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("SHARDGATE_")]:
            patch.delenv(name)
        for name, value in env_of(spec).items():
            patch.setenv(name, value)
        return load_settings()


def admin_routes() -> set[str]:
    source = (REPO_ROOT / "gateway" / "admin.py").read_text()
    return set(re.findall(r"add_get\(\s*\"([^\"]+)\"", source))


def watched_resources() -> set[tuple[str, str]]:
    """(apiGroup, resource) of every list call in the Kubernetes source (watches wrap list calls):
    the endpoints it declares in ``WATCHED``, and no call of the generated API classes."""
    from gateway.discovery import kubernetes as source

    tree = ast.parse(Path(source.__file__).read_text())
    generated = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not {name for name in generated if API_CALL_RE.match(name)}, "a generated API call: add it here"
    declared = {name for name, value in vars(source).items() if value in source.WATCHED}
    used = {
        node.args[1].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "list_call"
        and len(node.args) == 2
        and isinstance(node.args[1], ast.Name)
    }
    assert used and used <= declared, f"list_call with endpoints not in WATCHED: {used - declared}"
    found = set()
    for path, _ in source.WATCHED:
        match = API_PATH_RE.match(path)
        assert match, f"not a namespaced API path: {path}"
        found.add((match["group"] or "", match["resource"]))
    return found


def manifest_files() -> set[Path]:
    """YAML files under deploy/ that hold Kubernetes objects (not shard configs, rule files, ...)."""
    found: set[Path] = set()
    for path in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]:
        if path.name == "kustomization.yaml":
            continue
        try:
            docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        except yaml.YAMLError:
            continue
        if docs and all(isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys() for doc in docs):
            found.add(path.resolve())
    return found


def kustomization_inputs() -> set[Path]:
    used: set[Path] = set()
    for directory in kustomization_dirs():
        document = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in document.get("resources", []):
            path = (directory / entry).resolve()
            if path.is_file():
                used.add(path)
        for generator in document.get("configMapGenerator", []):
            for entry in generator.get("files", []):
                used.add((directory / entry.split("=", 1)[-1]).resolve())
    return used


# --- rendering and schema validation -----------------------------------------------------------


def test_every_manifest_file_is_rendered_by_a_kustomization() -> None:
    """So the kustomize-based checks below (and checkov's) see every object under deploy/."""
    assert len(manifest_files()) >= 10
    unused = {rel(path) for path in manifest_files()} - {rel(path) for path in kustomization_inputs()}
    assert not unused, f"not referenced by any kustomization.yaml: {sorted(unused)}"


def test_expected_kustomizations_exist(rendered: Rendered) -> None:
    assert {BASE, SHARDS, INGRESS} <= rendered.by_dir.keys()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_pass_strict_schema_validation(rendered: Rendered, version: str) -> None:
    problems: list[str] = []
    checked = 0
    for where, docs in rendered.by_dir.items():
        assert docs, f"{where} renders no object"
        for doc in docs:
            name = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except kubernetes_validate.SchemaNotFoundError:
                group = str(doc.get("apiVersion", "")).rpartition("/")[0]
                if group not in CUSTOM_RESOURCE_GROUPS:
                    problems.append(f"{name}: no schema for {doc.get('apiVersion')} in Kubernetes {version}")
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                problems.append(f"{name}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert checked >= 20


def test_strict_validation_catches_an_unknown_field(rendered: Rendered) -> None:
    """Guards the check above: a misspelt field must fail, not be ignored."""
    deployment = copy.deepcopy(gateway_deployment(rendered))
    container(deployment, GATEWAY)["readOnlyRootFileSystem"] = True  # misplaced + misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, MIN_KUBERNETES, strict=True)


def test_every_namespaced_object_is_in_the_shards_namespace(rendered: Rendered) -> None:
    cluster_scoped = {"Namespace"}
    for doc in rendered.all():
        if doc["kind"] in cluster_scoped:
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


# --- shard config --------------------------------------------------------------------------------


def test_configmap_shards_yaml_passes_shardgate_validate(rendered: Rendered, tmp_path: Path) -> None:
    configmap = rendered.one("ConfigMap", CONFIGMAP, BASE)
    assert set(configmap["data"]) == {CONFIG_KEY}
    path = tmp_path / CONFIG_KEY
    path.write_text(configmap["data"][CONFIG_KEY])
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = parse_shard_config(configmap["data"][CONFIG_KEY])
    assert [g.service for g in config.groups] == [f"data-writer-group-{i}" for i in (1, 2, 3)]
    assert all(g.port == "http" for g in config.groups)


def test_configmap_matches_the_example_config_family(rendered: Rendered) -> None:
    """deploy/base/shards.yaml and config/kubernetes.yaml describe the same groups and routing."""
    example = parse_shard_config((REPO_ROOT / "config" / "kubernetes.yaml").read_bytes())
    deployed = shard_config(rendered)
    assert deployed.routing == example.routing
    assert deployed.ring == example.ring
    assert deployed.groups == example.groups


def test_the_gateway_reads_the_generated_configmap(rendered: Rendered) -> None:
    env = gateway_env(rendered)
    assert env["SHARDGATE_CONFIGMAP"] == CONFIGMAP
    assert "SHARDGATE_CONFIG" not in env  # one source only: the ConfigMap


# --- RBAC ----------------------------------------------------------------------------------------


# What the hand-off's coordinator writes (gateway/coordination/): the shard-state ConfigMap
# (created, then replaced with compare-and-swap) and the Leases (the leader's, one per replica).
COORDINATION_WRITES = {
    ("", "configmaps"): {"create", "update"},
    ("coordination.k8s.io", "leases"): {"create", "update", "delete"},
}


def coordination_resources() -> set[tuple[str, str]]:
    from gateway.coordination import kube

    found = set()
    for path in (kube.CONFIGMAPS, kube.LEASES):
        match = API_PATH_RE.match(path)
        assert match, f"not a namespaced API path: {path}"
        found.add((match["group"] or "", match["resource"]))
    return found


def test_role_grants_only_what_the_code_watches_and_writes(rendered: Rendered) -> None:
    watched = watched_resources()
    assert watched == {("", "configmaps"), ("discovery.k8s.io", "endpointslices")}
    assert coordination_resources() == set(COORDINATION_WRITES)
    configmap = gateway_env(rendered)["SHARDGATE_CONFIGMAP"]
    role = rendered.one("Role", GATEWAY, BASE)
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        verbs = set(rule["verbs"])
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                writes = COORDINATION_WRITES.get(key, set())
                assert key in watched | set(COORDINATION_WRITES), f"the gateway does not use {resource!r}"
                assert verbs <= READ_VERBS | writes, (
                    f"{key}: verbs beyond its use: {sorted(verbs - READ_VERBS - writes)}"
                )
                granted.setdefault(key, set()).update(verbs)
                if resource == "configmaps" and "resourceNames" in rule:
                    # list/watch limited by name only work with a metadata.name field selector; the
                    # desired config is only read, the shard state is also written.
                    names = rule["resourceNames"]
                    assert names in ([configmap], [f"{configmap}-state"]), names
                    assert names == [f"{configmap}-state"] or verbs <= READ_VERBS
                    source = (REPO_ROOT / "gateway" / "discovery" / "kubernetes.py").read_text()
                    assert '"field_selector": f"metadata.name=' in source
                elif resource == "configmaps":
                    assert verbs == {"create"}, "only create may be granted for configmaps without a name"
    for key in watched:
        assert {"list", "watch"} <= granted.get(key, set()), f"{key} needs list and watch"
    for key, writes in COORDINATION_WRITES.items():
        assert writes <= granted.get(key, set()), f"{key} needs {sorted(writes)}"


def test_no_cluster_wide_rbac_and_the_binding_is_the_gateways(rendered: Rendered) -> None:
    for doc in rendered.all():
        assert doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}, doc["metadata"]["name"]
    binding = rendered.one("RoleBinding", GATEWAY, BASE)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY}
    spec = pod_spec(gateway_deployment(rendered))
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}
    ]
    rendered.one("ServiceAccount", spec["serviceAccountName"], BASE)
    assert spec["automountServiceAccountToken"] is True  # the gateway's watches need the token


# --- gateway container: env, probes, ports, lifecycle ----------------------------------------------


def test_env_names_are_ones_the_gateway_reads(rendered: Rendered) -> None:
    env_names = {item["name"] for item in container(gateway_deployment(rendered), GATEWAY)["env"]}
    unknown = env_names - gateway_env_names()
    assert not unknown, f"the gateway reads no such variable: {sorted(unknown)}"
    required = {
        "SHARDGATE_CONFIGMAP",
        "SHARDGATE_NAMESPACE",
        "SHARDGATE_LISTEN",
        "SHARDGATE_ADMIN_LISTEN",
        "SHARDGATE_DRAIN_DELAY",
        "SHARDGATE_GRACE_TIMEOUT",
    }
    assert required <= env_names


def test_namespace_comes_from_the_downward_api(rendered: Rendered) -> None:
    env = {item["name"]: item for item in container(gateway_deployment(rendered), GATEWAY)["env"]}
    assert env["SHARDGATE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_settings_from_the_manifest_env_match_the_ports(rendered: Rendered) -> None:
    spec = container(gateway_deployment(rendered), GATEWAY)
    settings = settings_from_env(spec)  # raises ConfigError on any bad value
    assert settings.configmap == CONFIGMAP and settings.config_path is None
    assert settings.namespace == NAMESPACE
    assert settings.listen == ("0.0.0.0", container_port(spec, "http")) == ("0.0.0.0", 8080)
    assert settings.admin_listen == ("0.0.0.0", container_port(spec, "admin")) == ("0.0.0.0", 9090)
    assert (settings.drain_delay, settings.grace_timeout) == (5.0, 20.0)
    assert spec["args"] == ["run"]


def test_probes_hit_admin_routes_on_the_admin_port(rendered: Rendered) -> None:
    spec = container(gateway_deployment(rendered), GATEWAY)
    settings = settings_from_env(spec)
    routes = admin_routes()
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe_name, path in expected.items():
        if probe_name == "startupProbe" and probe_name not in spec:
            continue
        probe = spec[probe_name]["httpGet"]
        assert probe["path"] == path and path in routes, f"{probe_name}: {probe['path']} not in {routes}"
        assert container_port(spec, probe["port"]) == settings.admin_listen[1], probe_name


def test_termination_grace_covers_prestop_drain_and_grace(rendered: Rendered) -> None:
    deployment = gateway_deployment(rendered)
    spec = container(deployment, GATEWAY)
    settings = settings_from_env(spec)
    pre_stop = spec.get("lifecycle", {}).get("preStop", {})
    assert "exec" not in pre_stop, "the image has no shell or sleep binary: use lifecycle.preStop.sleep"
    sleep = int(pre_stop.get("sleep", {}).get("seconds", 0))
    needed = sleep + settings.drain_delay + settings.grace_timeout + DRAIN_MARGIN_SECONDS
    period = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
    assert period >= needed, f"terminationGracePeriodSeconds {period} < {needed}"


def test_gateway_pod_is_locked_down(rendered: Rendered) -> None:
    deployment = gateway_deployment(rendered)
    pod = pod_spec(deployment)
    spec = container(deployment, GATEWAY)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    assert set(mounts) == {"/tmp"}, "nothing else is writable"
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= spec["resources"][key].keys()


@pytest.mark.parametrize("where", [BASE, SHARDS])
def test_every_container_is_locked_down(rendered: Rendered, where: str) -> None:
    for deployment in rendered.find("Deployment", where=where):
        pod = pod_spec(deployment)
        for spec in pod["containers"]:
            context = spec["securityContext"]
            name = f"{deployment['metadata']['name']}/{spec['name']}"
            assert context["runAsNonRoot"] is True, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context.get("privileged", False) is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            seccomp = context.get("seccompProfile") or pod["securityContext"].get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, name
            assert "livenessProbe" in spec and "readinessProbe" in spec, name


def test_gateway_runs_as_the_image_user(rendered: Rendered) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    users = re.findall(r"(?m)^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile)
    assert users, "the Dockerfile must set a numeric USER"
    uid, gid = users[-1]
    context = pod_spec(gateway_deployment(rendered))["securityContext"]
    assert str(context["runAsUser"]) == uid
    assert not gid or str(context["runAsGroup"]) == gid


def test_image_tag_is_the_project_version(rendered: Rendered) -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = container(gateway_deployment(rendered), GATEWAY)["image"]
    assert image.rpartition(":")[2] == version, image


# --- availability: replicas, spread, PDB, HPA --------------------------------------------------------


def test_gateway_replicas_spread_and_disruption_budget(rendered: Rendered) -> None:
    deployment = gateway_deployment(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    hostname = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert hostname and labels_match(hostname[0]["labelSelector"]["matchLabels"], pod_labels)
    pdb = rendered.one("PodDisruptionBudget", GATEWAY, BASE)
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable", 0) < deployment["spec"]["replicas"]


def test_hpa_scales_the_gateway(rendered: Rendered) -> None:
    hpa = rendered.one("HorizontalPodAutoscaler", GATEWAY, BASE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["minReplicas"] == gateway_deployment(rendered)["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


# --- Services, NetworkPolicy, Ingress ----------------------------------------------------------


def test_services_split_traffic_and_metrics(rendered: Rendered) -> None:
    deployment = gateway_deployment(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = container(deployment, GATEWAY)
    settings = settings_from_env(spec)
    traffic = rendered.one("Service", GATEWAY, BASE)
    metrics = rendered.one("Service", METRICS_SERVICE, BASE)
    for service in (traffic, metrics):
        assert labels_match(service["spec"]["selector"], pod_labels)
        assert len(service["spec"]["ports"]) == 1
    (traffic_port,) = traffic["spec"]["ports"]
    assert traffic_port["port"] == 80 and traffic_port["name"] == "http"
    assert container_port(spec, traffic_port["targetPort"]) == settings.listen[1]
    (metrics_port,) = metrics["spec"]["ports"]
    assert metrics_port["port"] == 9090
    assert container_port(spec, metrics_port["targetPort"]) == settings.admin_listen[1]


def _peer_namespaces(rule: dict[str, Any]) -> set[str]:
    return {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]}


def test_network_policy_of_the_gateway(rendered: Rendered) -> None:
    deployment = gateway_deployment(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = container(deployment, GATEWAY)
    policy = rendered.one("NetworkPolicy", GATEWAY, BASE)["spec"]
    assert labels_match(policy["podSelector"]["matchLabels"], pod_labels)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    by_port: dict[int, set[str]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(container_port(spec, port["port"]), set()).update(_peer_namespaces(rule))
    assert by_port == {8080: {"ingress-nginx"}, 9090: {"monitoring"}}
    egress_ports = {port["port"] for rule in policy["egress"] for port in rule.get("ports", [])}
    assert {443, 6443, "http"} <= egress_ports  # API server, shard pods


def test_ingress_sends_traffic_to_the_gateway_service_only(rendered: Rendered) -> None:
    (ingress,) = rendered.find("Ingress", where=INGRESS)
    traffic = rendered.one("Service", GATEWAY, BASE)
    port_names = {port["name"] for port in traffic["spec"]["ports"]}
    backends = [
        path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]
    ]
    assert backends
    for backend in backends:
        assert backend["name"] == GATEWAY, "the Ingress must never reach the admin Service"
        assert backend["port"].get("name") in port_names or backend["port"].get("number") == 80


# --- example shard groups ------------------------------------------------------------------------


def test_example_shard_groups_match_the_configmap(rendered: Rendered) -> None:
    config = shard_config(rendered)
    services = {s["metadata"]["name"]: s for s in rendered.find("Service", where=SHARDS)}
    deployments = rendered.find("Deployment", where=SHARDS)
    groups = [g for g in config.groups if g.service is not None]
    assert {g.service for g in groups} == set(services), "one Service per group, and no other"
    assert len(deployments) == len(groups), "one Deployment per group"
    for group in groups:
        service = services[group.service or ""]
        ports = service["spec"]["ports"]
        assert any(group.port in (p.get("name"), p["port"]) for p in ports), f"{group.name}: {group.port}?"
        selector = service["spec"]["selector"]
        assert selector.get("shard-group") == group.name and "app" in selector
        backing = [
            d for d in deployments if labels_match(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(backing) == 1, f"Service {group.service} must select exactly one group's pods"
        deployment = backing[0]
        assert deployment["spec"]["replicas"] >= 2
        assert deployment["metadata"]["labels"]["shard-group"] == group.name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert {"app", "shard-group"} <= labels.keys()
        for port in ports:  # the Service's targetPort is a real container port
            container_port(container(deployment), port["targetPort"])


def test_shard_pods_are_reachable_from_the_gateway_only(rendered: Rendered) -> None:
    gateway_labels = gateway_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    gateway_policy = rendered.one("NetworkPolicy", GATEWAY, BASE)["spec"]
    (shard_policy,) = rendered.find("NetworkPolicy", where=SHARDS)
    for deployment in rendered.find("Deployment", where=SHARDS):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        spec = container(deployment)
        # the gateway's egress rule to shard pods selects these pods, on a port they have
        egress = [r for r in gateway_policy["egress"] if "to" in r and "podSelector" in r["to"][0]]
        selector = egress[0]["to"][0]["podSelector"]["matchExpressions"][0]
        assert selector == {"key": "shard-group", "operator": "Exists"} and "shard-group" in labels
        for port in egress[0]["ports"]:
            container_port(spec, port["port"])
        # and their own policy admits the gateway's pods only
        assert shard_policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = shard_policy["spec"]["ingress"]
        (peer,) = rule["from"]
        assert labels_match(peer["podSelector"]["matchLabels"], gateway_labels)
