"""deploy/monitoring: the alert rules, the PrometheusRule, the dashboard and the kustomization.

Rules are checked and unit-tested with promtool. Every PromQL expression (rules, dashboard panels,
dashboard variables) may only name metrics the gateway really exports: the list is built from a
real scrape of a gateway that shows every family it has (``--workers 2`` for the worker families,
a Kubernetes source against the API-server double for the discovery families, some traffic).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s.apiserver import FakeApiServer
from tests.k8s.conftest import Client, GatewayFactory, Group, Recipe, put_config, put_pods
from tests.k8s.pods import PodFarm
from tests.observability.conftest import promtool, require_promtool, wait_for
from tests.support import require_tool

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "shardgate-rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "shardgate-dashboard.json"
RULE_TESTS = MONITORING / "tests" / "shardgate-rules.test.yaml"
SERVICE_MONITOR = MONITORING / "servicemonitor.yaml"
KUSTOMIZATION = MONITORING / "kustomization.yaml"
METRICS_SERVICE = REPO / "deploy" / "base" / "service-metrics.yaml"
METRICS_SOURCE = REPO / "gateway" / "observability" / "metrics.py"

# Names Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up"}

REQUIRED_ALERTS = {
    "ShardUnavailable",
    "EpochDisagreement",
    "ConfigRejected",
    "DiscoveryDisconnected",
    "ErrorBudgetBurnFast",
    "ErrorBudgetBurnSlow",
    "LatencyBudgetBurnFast",
    "LatencyBudgetBurnSlow",
    "HandoffStuck",
    "ShardStateUnconfirmed",
    "ShardGroupEjected",
    "SustainedRateLimiting",
    "RetryBudgetExhausted",
}

# Grafana variables, replaced by values a real query could have, for PromQL syntax checks.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$group": ".*",
    "$pod": ".*",
}


# ---------------------------------------------------------------------------------------------
# Metric names in PromQL

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z]+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def le_matchers(expr: str) -> list[tuple[str, str]]:
    """(metric, le value) for every ``metric{..., le="X"}`` selector."""
    out = []
    for match in _SELECTOR.finditer(expr):
        for le in re.findall(r'\ble\s*=\s*"([^"]*)"', match.group(2)):
            out.append((match.group(1), le))
    return out


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, group) (rate(a_bucket{job=~"$job", le!="x"}[5m])))'
        " / on (group) group_left(pod) b_total offset 5m > 1e3 and count by (epoch) (c_info)"
        " unless sum without (x) (d) * 14.4 or vector(0) > bool inf"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c_info", "d"}
    assert le_matchers('x_bucket{le="0.25", job="j"} + y') == [("x_bucket", "0.25")]


# ---------------------------------------------------------------------------------------------
# A real scrape with every family present


@dataclass(frozen=True)
class Exported:
    text: str
    names: set[str]  # every series name the gateway exposes
    families: set[str]
    bucket_bounds: dict[str, set[str]]  # histogram _bucket name -> le values


def exported_names(text: str) -> Exported:
    names: set[str] = set()
    families: set[str] = set()
    bounds: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
            else:
                names.add(name)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, set()).add(sample.labels["le"])
    return Exported(text, names, families, bounds)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    with FakeApiServer() as api, PodFarm(4) as farm:
        groups = [Group("mon-a", "svc-mon-a"), Group("mon-b", "svc-mon-b")]
        put_config(api, groups)
        put_pods(api, farm, "svc-mon-a", farm.hosts[0:2])
        put_pods(api, farm, "svc-mon-b", farm.hosts[2:3])
        factory = GatewayFactory(api, tmp_path_factory.mktemp("monitoring-gateway"))
        try:
            gw = factory(env={"SHARDGATE_WORKERS": "2"})
            recipe = Recipe(groups)
            client = Client(gw.port)

            def serving() -> bool:
                return all(client.write(recipe.keys_of(g.name, 1)[0]).status == 200 for g in groups)

            assert wait_for(serving), gw.log_tail()
            assert client.read("reader").status == 200
            assert client.request("POST", None).status == 400  # a refusal
            client.close()
            put_pods(api, farm, "svc-mon-b", farm.hosts[2:4])  # a watch event: its age series shows

            def everything() -> bool:
                status, body = gw.admin_get("/metrics")
                return status == 200 and b"shardgate_discovery_last_event_age_seconds{" in body

            assert wait_for(everything), gw.log_tail()
            status, body = gw.admin_get("/metrics")
            assert status == 200
            yield exported_names(body.decode())
        finally:
            problems = factory.close()
        assert problems == [], problems


def test_the_scrape_has_every_family_the_gateway_defines(exported: Exported) -> None:
    defined = set(re.findall(r'"(shardgate_[a-z_]+)"', METRICS_SOURCE.read_text()))
    assert len(defined) > 20, defined
    missing = {name for name in defined if not {name, name + "_total", name + "_info"} & exported.families}
    assert missing == set(), f"families defined in metrics.py but not in the scrape: {missing}"


def test_promtool_check_metrics_on_a_scrape_with_every_family(exported: Exported) -> None:
    require_promtool()
    result = promtool("check", "metrics", stdin=exported.text)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


# ---------------------------------------------------------------------------------------------
# Rules


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_groups() -> list[dict[str, Any]]:
    doc = load_yaml(RULES)
    assert isinstance(doc, dict) and list(doc) == ["groups"], list(doc)
    groups = doc["groups"]
    assert isinstance(groups, list) and groups
    return groups


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def test_rules_file_passes_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    alerts = {rule.get("alert") for rule in all_rules()}
    assert REQUIRED_ALERTS <= alerts, REQUIRED_ALERTS - alerts
    for rule in all_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_prometheusrule_holds_the_same_rules_and_passes_promtool(tmp_path: Path) -> None:
    manifest = load_yaml(PROMETHEUS_RULE)
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"]
    assert manifest["spec"]["groups"] == rule_groups(), "prometheusrule.yaml and shardgate-rules.yaml differ"
    extracted = tmp_path / "from-prometheusrule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": manifest["spec"]["groups"]}, sort_keys=False))
    result = promtool("check", "rules", str(extracted))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    tests = load_yaml(RULE_TESTS)
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"EpochDisagreement", "ConfigRejected"} <= firing, firing
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------
# Dashboard


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target."""
    return [
        (panel["title"], target["expr"])
        for panel in panels_of(dashboard())
        for target in panel.get("targets", [])
    ]


def variable_metrics() -> list[tuple[str, str]]:
    """(variable name, metric) of every ``label_values(metric{...}, label)`` variable query."""
    out = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(
            r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^{}]*\})?\s*,\s*\w+\s*\)", query
        )
        assert match, (variable["name"], query)
        out.append((variable["name"], match.group(1)))
    return out


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_valid_and_every_panel_has_a_query() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"]
    panels = panels_of(doc)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    data_panels = [p for p in panels if p["type"] != "row"]  # rows only group panels
    assert len(data_panels) >= 10
    for panel in data_panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        for target in targets:
            assert target.get("expr", "").strip(), (panel["title"], target)
            assert target.get("refId"), (panel["title"], target)
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "group" in variables, "the group view needs a $group variable"
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    assert "$group" in exprs
    # The views the fleet, group and pod sections must show.
    flat = re.sub(r"\s+", " ", exprs)
    for needle in (
        "count by (epoch) (shardgate_config_epoch_info",
        'shardgate_group_pods{job=~"$job",state="ready"}',
        "shardgate_discovery_watch_up",
        "histogram_quantile(0.5, sum by (le) (rate(shardgate_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(shardgate_request_duration_seconds_bucket",
        "sum by (reason) (rate(shardgate_refusals_total",
        'code_class="5xx"',
        "shardgate_pod_inflight_requests",
        'shardgate_pod_upstream_connections{job=~"$job",group=~"$group",pod=~"$pod",state="idle"}',
    ):
        assert needle in flat, needle


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (Grafana variables replaced) as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Rules + dashboard vs. what the gateway exports


def test_every_expression_names_only_exported_metrics(exported: Exported) -> None:
    known = exported.names | PROMETHEUS_SERIES
    checked: list[tuple[str, str]] = [
        (f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in all_rules()
    ]
    checked += [(f"panel {title!r}", expr) for title, expr in dashboard_exprs()]
    problems = []
    for where, expr in checked:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        unknown = names - known
        if unknown:
            problems.append(f"{where}: {sorted(unknown)} not exported")
        for metric, le in le_matchers(expr):
            if le not in exported.bucket_bounds.get(metric, set()):
                problems.append(f"{where}: {metric} has no bucket le={le!r}")
    for name, metric in variable_metrics():
        if metric not in known:
            problems.append(f"variable ${name}: {metric} not exported")
    assert problems == [], "\n".join(problems)
    assert len(checked) > 30


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def test_servicemonitor_selects_the_metrics_service() -> None:
    monitor = load_yaml(SERVICE_MONITOR)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    endpoints = monitor["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]
    assert endpoints[0].get("honorLabels") is True, "the gateway's own `pod` label must survive"
    if not METRICS_SERVICE.exists():
        pytest.skip(f"{METRICS_SERVICE.relative_to(REPO)} not present")
    service = load_yaml(METRICS_SERVICE)
    assert service["kind"] == "Service"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), (
        selector,
        service["metadata"]["labels"],
    )
    assert "metrics" in [p.get("name") for p in service["spec"]["ports"]]
    namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames")
    assert namespaces is None or service["metadata"]["namespace"] in namespaces


def test_kustomization_lists_the_manifests_and_the_dashboard_configmap() -> None:
    kustomization = load_yaml(KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == ["prometheusrule.yaml", "servicemonitor.yaml"]
    for name in kustomization["resources"]:
        assert (MONITORING / name).is_file(), name
    [generator] = kustomization["configMapGenerator"]
    assert generator["files"] == ["shardgate-dashboard.json"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"


def test_kustomize_renders_the_monitoring_objects() -> None:
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}
    assert set(objects) == {
        ("ConfigMap", "shardgate-dashboard"),
        ("PrometheusRule", "shardgate"),
        ("ServiceMonitor", "shardgate"),
    }
    configmap = objects[("ConfigMap", "shardgate-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["shardgate-dashboard.json"]) == dashboard()
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"shards"}
