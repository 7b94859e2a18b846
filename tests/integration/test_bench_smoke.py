"""Smoke test of the benchmark harness (bench/run.py).

`test_bench_smoke` runs every measurement in a reduced form: it starts the real backends, the
Kubernetes API-server double, both builds of shardgate (its Kubernetes config source), nginx and
HAProxy, checks each proxy's header work, drives each with wrk for one second per measurement
(throughput and latency with Ingress-shaped and bare requests, upload, download), holds 500 idle
connections instead of 10,000 and runs the micro-benchmarks with few calls; then it checks the
JSON report, the Markdown and the table (about a minute). It needs nginx, HAProxy and wrk on the
machine (`make test` installs them; ``require_tool``: a failure on CI, elsewhere a skip that
says why); it never installs anything (`--no-install`). The other tests check the harness's
pieces (request shapes, generated configs, the header rules, wrk output parsing, the build
probe, `--skip`, `--record`) and need no external tool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httptools
import pytest

from bench import run
from bench.build import BuildInfo, build_from, is_extension, probe_build
from bench.configs import (
    REQUEST_ID_REGEX,
    group_ports,
    render_backends_nginx,
    render_haproxy,
    render_proxy_nginx,
    render_shard_config,
)
from bench.headers import parity_problems, probe_requests
from bench.idle import _response_complete
from bench.k8s import fixtures
from bench.micro import shard_config_text
from bench.shapes import REQUESTS, request, request_parts, write_requests
from bench.systems import REPO_ROOT, gateway_python, shardgate_env
from bench.tables import format_markdown
from bench.wrk import parse_wrk_output
from gateway.config import parse_shard_config
from gateway.discovery.kubernetes import SERVICE_NAME_LABEL, pods_by_group
from gateway.observability.tracing import parse_traceparent
from gateway.proxy.http import valid_request_id
from tests.support import require_tool

PORTS = [9001, 9002, 9003, 9004, 9005, 9006]
EPOCH = "0123456789abcdef"

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:18555/orders
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.98ms  561.95us   5.67ms   75.23%
    Req/Sec     1.97k   114.93     2.13k    63.64%
  Latency Distribution
     50%  912.00us
     75%    2.25ms
     90%    2.61ms
     99%    1.20s
  2152 requests in 1.10s, 1.14MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 17
Requests/sec:   1954.85
Transfer/sec:      1.03MB
"""


def test_parse_wrk_output() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.rps == pytest.approx(1954.85)
    assert result.p50_ms == pytest.approx(0.912)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.requests == 2152
    assert result.duration_s == pytest.approx(1.1)
    assert result.non_2xx == 17
    assert result.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 2}
    assert result.errors == 22
    assert result.mean_ms == pytest.approx(1.98)
    assert result.read_bytes == round(1.14 * 2**20)


def test_parse_wrk_output_without_errors() -> None:
    text = WRK_OUTPUT.replace("  Socket errors: connect 0, read 3, write 0, timeout 2\n", "").replace(
        "  Non-2xx or 3xx responses: 17\n", ""
    )
    assert parse_wrk_output(text).errors == 0


# ---------------------------------------------------------------------------------- requests


class _Parsed:
    """httptools callbacks: what llhttp (the gateway's parser) makes of a request."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _parse(data: bytes) -> _Parsed:
    parsed = _Parsed()
    httptools.HttpRequestParser(parsed).feed_data(data)
    return parsed


def test_ingress_requests_carry_what_ingress_nginx_sets() -> None:
    parsed = _parse(request("ingress", 7))
    names = [name for name, _ in parsed.headers]
    assert names == [
        "Host", "X-Request-ID", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Port",
        "X-Forwarded-Proto", "X-Forwarded-Scheme", "X-Scheme", "Content-Length", "User-Agent", "Accept",
        "Content-Type", "traceparent", "User-ID",
    ]  # fmt: skip
    fields = dict(parsed.headers)
    assert parsed.complete and json.loads(parsed.body)["customer"] == fields["User-ID"] == "user-00007"
    assert fields["X-Real-IP"] == fields["X-Forwarded-For"]
    assert valid_request_id(fields["X-Request-ID"].encode()) and len(fields["X-Request-ID"]) == 32
    assert parse_traceparent(fields["traceparent"].encode()) is not None, fields["traceparent"]
    assert fields["User-Agent"].startswith("Mozilla/5.0")


def test_requests_vary_ids_and_keys_but_not_between_runs() -> None:
    first, second = dict(request_parts("ingress", 1)[0]), dict(request_parts("ingress", 2)[0])
    for name in ("X-Request-ID", "traceparent", "User-ID", "X-Forwarded-For"):
        assert first[name] != second[name], name
    assert request("ingress", 1) == request("ingress", 1)
    assert dict(request_parts("bare", 3)[0]) == {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "User-ID": "user-00003",
        "Content-Length": "48",
    }


def test_requests_file_is_what_post_lua_reads(tmp_path: Path) -> None:
    path = write_requests(tmp_path / "requests.bin", "ingress", count=3)
    data = path.read_bytes()
    found = []
    while data:
        length, _, data = data.partition(b"\n")
        found.append(data[: int(length)])
        data = data[int(length) :]
    assert found == [request("ingress", i) for i in range(3)]
    assert REQUESTS == 10_000


# ---------------------------------------------------------------------------------- configs


def test_shard_config_is_valid_for_the_gateway() -> None:
    config = parse_shard_config(render_shard_config())
    assert [group.name for group in config.groups] == ["group-1", "group-2", "group-3"]
    assert (config.groups[0].service, config.groups[0].port) == ("data-writer-group-1", "http")
    assert config.routing.key_header == "User-ID"


def test_endpointslices_resolve_to_the_six_backends() -> None:
    """One slice per pod (a slice's port applies to all its endpoints), merged per Service."""
    config = parse_shard_config(render_shard_config())
    slices = {
        item["name"]: {
            "metadata": {"name": item["name"], "labels": {SERVICE_NAME_LABEL: item["service"]}},
            "endpoints": item["endpoints"],
            "ports": item["ports"],
        }
        for item in fixtures(PORTS)["endpointslices"]
    }
    pods = pods_by_group(config, slices)
    assert {group: sorted(p.port for p in found) for group, found in pods.items()} == {
        "group-1": [9001, 9002],
        "group-2": [9003, 9004],
        "group-3": [9005, 9006],
    }
    assert group_ports(PORTS)[2] == [9005, 9006]


def test_micro_benchmark_configs_differ_as_intended() -> None:
    base = parse_shard_config(shard_config_text(64, 16))
    moved = parse_shard_config(shard_config_text(64, 16, moved_pod=True))
    reweighted = parse_shard_config(shard_config_text(64, 16, first_weight=2))
    assert len(base.groups) == 64 and all(len(group.endpoints or ()) == 16 for group in base.groups)
    assert [g.weight for g in moved.groups] == [g.weight for g in base.groups]
    assert moved.groups[0].endpoints != base.groups[0].endpoints
    assert moved.groups[1:] == base.groups[1:]
    assert reweighted.groups[0].weight == 2 and reweighted.groups[0].endpoints == base.groups[0].endpoints


def test_transfer_and_idle_configs(tmp_path: Path) -> None:
    backends = render_backends_nginx(tmp_path, [9001])
    assert "proxy_pass_request_body off;" in backends  # /upload reads the whole body, then answers
    assert "client_body_buffer_size 2m;" in backends  # ... in memory
    assert "location = /headers" in backends  # the header check's relay to the capture socket
    haproxy = render_haproxy(9000, [9001], EPOCH, max_clients=10_000)
    assert "maxconn 11024" in haproxy


def test_proxies_are_configured_to_do_the_gateways_header_work(tmp_path: Path) -> None:
    nginx = render_proxy_nginx(tmp_path, 9000, PORTS, EPOCH)
    for directive in (
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Request-ID $kept_request_id;",
        "proxy_set_header Via $via_chain;",
        f"proxy_set_header X-Shard-Epoch {EPOCH};",
        "proxy_set_header Host $http_host;",
        "add_header X-Request-ID $kept_request_id always;",
        f'"~{REQUEST_ID_REGEX}" $http_x_request_id;',
        "127.0.0.1:9006 group-3;",
    ):
        assert directive in nginx, directive
    # Set once, at server level: a location with a proxy_set_header of its own would inherit none.
    assert nginx.count("proxy_set_header") == 9
    haproxy = render_haproxy(9000, PORTS, EPOCH)
    for directive in (
        "option forwardfor",
        "http-request del-header x-shard- -m beg",
        "http-send-name-header X-Shard-Group",
        "http-after-response set-header X-Request-ID %[var(txn.request_id)]",
        f"-m reg '{REQUEST_ID_REGEX}'",
        "server group-3-b 127.0.0.1:9006",
    ):
        assert directive in haproxy, directive
    assert "if-none" not in haproxy


def test_header_rules() -> None:
    """What the header check accepts: the gateway's rules, the lines of one field joined."""
    (_, ingress, _), _, (_, chained, _) = probe_requests()
    sent = dict(ingress)
    kept = [(name, value) for name, value in ingress if name not in ("X-Forwarded-For", "Content-Length")]
    added = [("Via", "1.1 shardgate"), ("X-Shard-Epoch", EPOCH), ("X-Shard-Group", "group-1")]
    response = [("X-Request-ID", sent["X-Request-ID"]), ("X-Shard-Group", "group-1")]
    appended = [*kept, ("X-Forwarded-For", f"{sent['X-Forwarded-For']}, 127.0.0.1"), *added]
    assert parity_problems(ingress, appended, response, EPOCH) == []
    # HAProxy's way, the peer on a line of its own, is the same list.
    lines = [*kept, ("X-Forwarded-For", sent["X-Forwarded-For"]), ("X-Forwarded-For", "127.0.0.1"), *added]
    assert parity_problems(ingress, lines, response, EPOCH) == []
    replaced = [*kept, ("X-Forwarded-For", "127.0.0.1"), *added]
    assert any("X-Forwarded-For" in p for p in parity_problems(ingress, replaced, response, EPOCH))
    new_id = [(name, "other-id" if name == "X-Request-ID" else value) for name, value in appended]
    assert any("X-Request-ID" in p for p in parity_problems(ingress, new_id, response, EPOCH))
    # The chained probe's invalid id must be replaced and its Via chained.
    client = dict(chained)
    assert client["Via"] == "1.1 edge" and not valid_request_id(client["X-Request-ID"].encode())
    kept_invalid = [("X-Request-ID", client["X-Request-ID"]), ("Via", "1.1 nginx")]
    problems = parity_problems(chained, kept_invalid, [], EPOCH)
    assert any("expected a new valid id" in p for p in problems)
    assert any("Via" in p for p in problems)


def test_idle_response_framing() -> None:
    assert _response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n") == (True, 200)
    assert _response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok") == (False, 200)
    assert _response_complete(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n") == (True, 503)
    assert _response_complete(b"HTTP/1.1 200 OK\r\n") == (False, 0)


# ---------------------------------------------------------------------------------- builds


def test_build_probe() -> None:
    assert is_extension("/x/gateway/proxy/client.cpython-311-x86_64-linux-gnu.so")
    assert not is_extension("/x/gateway/proxy/client.py") and not is_extension(None)
    compiled = build_from(
        {"modules": {"gateway.proxy.client": "/x/client.abi3.so", "gateway.ring": "/x/ring.py"}}
    )
    assert (compiled.build, compiled.compiled) == ("compiled", ["gateway.proxy.client"])
    pure = probe_build(gateway_python(), shardgate_env("shardgate-pure"), REPO_ROOT)
    assert pure.build == "pure", pure
    assert pure.modules["gateway.proxy.client"].endswith("client.py")
    assert shardgate_env("shardgate-pure")["SHARDGATE_PURE_PYTHON"] == "1"


def test_shardgate_env_drops_inherited_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDGATE_PURE_PYTHON", "1")
    monkeypatch.setenv("SHARDGATE_CONFIG", "/elsewhere.yaml")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    env = shardgate_env("shardgate", {"SHARDGATE_WORKERS": "1"})
    assert not {"SHARDGATE_PURE_PYTHON", "SHARDGATE_CONFIG", "KUBERNETES_SERVICE_HOST"} & set(env)
    assert env["SHARDGATE_WORKERS"] == "1" and env["PATH"] == os.environ["PATH"]
    mismatch = BuildInfo("pure", {}, "/x", loaded_extensions=["proxy/server.so"])
    assert mismatch.mismatch is not None


# ---------------------------------------------------------------------------------- whole runs


def test_micro_only_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--skip` everything but the micro-benchmarks: a process per build, no server started;
    `--record` writes NAME.json and NAME.md."""
    output = tmp_path / "micro.json"
    status = run.main(
        [
            "--skip", "throughput,latency,transfer,rss",
            "--micro-calls", "2000",
            "--micro-repeats", "1",
            "--no-install",
            "--output", str(output),
            "--record", "smoke",
            "--results-dir", str(tmp_path / "results"),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert status == 0, table
    report = json.loads(output.read_text())
    assert report["skipped"] == ["throughput", "latency", "transfer", "rss"]
    assert "direct" not in report["systems"]
    micro = report["micro"]["systems"]
    assert set(micro) == {"shardgate", "shardgate-pure"}
    assert micro["shardgate-pure"]["build"] == "pure"
    routing = micro["shardgate"]["routing"]
    assert [(r["groups"], r["pods_per_group"]) for r in routing] == [(3, 2), (64, 16)]
    assert micro["shardgate"]["rebuild"]["weight_change_ms"] > 0
    keys = {"route_hot_3x2", "route_cold_3x2", "route_hot_64x16", "route_cold_64x16"}
    assert {(t["key"], t["system"]) for t in report["targets"]} == {
        (key, system) for key in keys for system in ("shardgate", "shardgate-pure")
    }
    assert "route us (hot key cache, 3x2 pods)" in table and "shardgate-pure verdict" in table
    assert "throughput req/s" not in table and "idle keep-alive" not in table
    assert output.with_suffix(".md").exists()
    recorded = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert recorded["host"]["cpu_model"] and recorded["host"]["memory_gib"] > 0
    markdown = (tmp_path / "results" / "smoke.md").read_text()
    assert markdown.startswith("# shardgate benchmark: smoke")
    for text in ("## Machine", "| CPU |", "| load average at start", "| kernel |", "## Results", "verdict"):
        assert text in markdown, text


def _check_system(name: str, entry: dict[str, Any], table: str) -> None:
    assert entry["failure"] is None, f"{name}: {entry['failure']}"
    assert entry["errors"] == 0, f"{name} had failed requests/connections: {entry}\n{table}"
    for shape in ("ingress", "bare"):
        throughput, latency = entry["throughput"][shape], entry["latency_c1"][shape]
        assert len(throughput["runs"]) == 1 and throughput["median"]["rps"] > 0, f"{name} {shape}\n{table}"
        assert len(latency["runs"]) == 1 and latency["median"]["p50_us"] > 0, f"{name} {shape}"
    assert entry["upload"]["median_mib_s"] > 0, f"{name} uploaded nothing\n{table}"
    assert entry["download"]["median_mib_s"] > 0, f"{name} downloaded nothing\n{table}"
    if entry["reference"]:
        assert entry["idle_connections"] is None and entry["header_check"] is None
        return
    idle = entry["idle_connections"]
    assert idle["still_open"] == 500, f"{name}: {idle}"
    assert idle["rss_kb"] > 0 and idle["peak_kb"] >= idle["rss_kb"] > 0, f"{name}: {idle}"
    check = entry["header_check"]
    assert [p["name"] for p in check["probes"]] == ["ingress", "bare", "chained"]
    assert check["problems"] == [], f"{name} does not do the gateway's header work: {check['problems']}"


def _check_shardgate(name: str, entry: dict[str, Any], epoch: str) -> None:
    assert entry["build"]["build"] in ("pure", "compiled"), entry["build"]
    if name == "shardgate-pure":
        assert entry["build"]["build"] == "pure" and not entry["build"]["loaded_extensions"]
    source = entry["config_source"]
    assert source["source"] == "configmap:shards/shardgate-shards", source
    assert source["watches"] == {
        "configmap/shardgate-shards": "watching",
        "configmap/shardgate-shards-state": "watching",
        "endpointslices": "watching",
    }
    assert source["epoch"] == epoch and source["pods"] == 6, source


@pytest.mark.timeout(300)
def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_tool("nginx")
    require_tool("haproxy")
    require_tool("wrk")
    output = tmp_path / "bench.json"
    proxies = ["shardgate", "shardgate-pure", "nginx", "haproxy"]
    status = run.main(
        [
            "--duration", "1",
            "--runs", "1",
            "--warmup", "0",
            "--systems", ",".join(proxies),
            "--latency-duration", "1",
            "--latency-runs", "1",
            "--transfer-duration", "1",
            "--rss-connections", "500",
            "--micro-calls", "20000",
            "--micro-repeats", "3",
            "--no-install",
            "--output", str(output),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert output.exists(), "the benchmark wrote no JSON report"
    report = json.loads(output.read_text())
    systems = report["systems"]
    assert list(systems) == [*proxies, "direct"], table
    for name, entry in systems.items():
        _check_system(name, entry, table)
    for name in ("shardgate", "shardgate-pure"):
        _check_shardgate(name, systems[name], report["params"]["epoch"])
        assert systems[name]["throughput"]["ingress"]["ratio_to_nginx"]["rps"] > 0
        assert systems[name]["latency_c1"]["ingress"]["added_p50_us"] is not None
        assert report["micro"]["systems"][name]["routing"][0]["hot_us"] > 0
    assert systems["nginx"]["throughput"]["bare"]["ratio_to_nginx"]["rps"] == pytest.approx(1.0)
    targets = {(t["key"], t["system"]): t for t in report["targets"]}
    for key in ("rps_ratio", "p99_ratio", "added_latency", "upload_ratio", "download_ratio", "rss"):
        for name in ("shardgate", "shardgate-pure"):
            assert targets[(key, name)]["verdict"] in ("PASS", "MISS"), targets[(key, name)]
    assert targets[("rps_ratio", "shardgate")]["limit"] == 1.0
    assert targets[("rps_ratio", "shardgate-pure")]["limit"] == 0.75
    assert status == 0, table
    for text in (
        "throughput req/s, Ingress-shaped",
        "throughput req/s, bare",
        "latency c=1 p50 us, bare",
        "direct (ref)",
        "gateway build",
        "peak RSS MB",
        "header check",
        "transfer settings: nginx",
    ):
        assert text in table, text
    markdown = format_markdown(report)
    assert "## Header check" in markdown and "1.1 edge, 1.1 nginx" in markdown
    assert output.with_suffix(".md").read_text() == markdown
