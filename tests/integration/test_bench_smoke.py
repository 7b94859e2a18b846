"""Smoke test of the benchmark harness (bench/run.py).

`test_bench_smoke` runs every measurement in a reduced form: it starts the real backends, nginx
and shardgate, drives each with wrk for one second per measurement (throughput, latency at
concurrency 1, upload, download), holds 500 idle connections instead of 10,000 and runs the
micro-benchmarks with few calls; then it checks the JSON report and the table (about 25 s). It
needs nginx and wrk on the machine and is skipped without them (it never installs anything:
`--no-install`). The other tests check the harness's own pieces (wrk output parsing, generated
configs, `--skip`, the micro-benchmarks alone) and need no external tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run
from bench.idle import _response_complete
from bench.micro import shard_config_text
from bench.systems import group_ports, render_backends_nginx, render_haproxy, render_shard_config
from bench.tools import which
from bench.wrk import parse_wrk_output
from gateway.config import parse_shard_config

MISSING = [tool for tool in ("nginx", "wrk") if which(tool) is None]

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


def test_shard_config_is_valid_for_the_gateway() -> None:
    config = parse_shard_config(render_shard_config(group_ports([9001, 9002, 9003, 9004, 9005, 9006])))
    assert [group.name for group in config.groups] == ["group-1", "group-2", "group-3"]
    assert config.groups[2].endpoints == ("127.0.0.1:9005", "127.0.0.1:9006")
    assert config.routing.key_header == "User-ID"


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
    haproxy = render_haproxy(9000, [9001], max_clients=10_000)
    assert "maxconn 11024" in haproxy


def test_idle_response_framing() -> None:
    assert _response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n") == (True, 200)
    assert _response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok") == (False, 200)
    assert _response_complete(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n") == (True, 503)
    assert _response_complete(b"HTTP/1.1 200 OK\r\n") == (False, 0)


def test_micro_only_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--skip` everything but the in-process micro-benchmarks: no process is started."""
    output = tmp_path / "micro.json"
    status = run.main(
        [
            "--skip", "throughput,latency,transfer,rss",
            "--micro-calls", "2000",
            "--micro-repeats", "1",
            "--no-install",
            "--output", str(output),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert status == 0, table
    report = json.loads(output.read_text())
    assert report["skipped"] == ["throughput", "latency", "transfer", "rss"]
    assert "direct" not in report["systems"]
    assert [(r["groups"], r["pods_per_group"]) for r in report["micro"]["routing"]] == [(3, 2), (64, 16)]
    assert report["micro"]["rebuild"]["weight_change_ms"] > 0
    assert {t["key"] for t in report["targets"]} == {
        "route_hot_3x2",
        "route_cold_3x2",
        "route_hot_64x16",
        "route_cold_64x16",
    }
    assert "route us (hot key cache, 3x2 pods)" in table
    assert "throughput req/s" not in table and "idle keep-alive" not in table


@pytest.mark.skipif(
    bool(MISSING),
    reason=f"benchmark smoke test needs {' and '.join(MISSING)} (apt-get install -y {' '.join(MISSING)})",
)
@pytest.mark.timeout(90)
def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "bench.json"
    status = run.main(
        [
            "--duration", "1",
            "--runs", "1",
            "--warmup", "0",
            "--systems", "nginx,shardgate",
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
    assert set(systems) == {"nginx", "shardgate", "direct"}, table
    for name, entry in systems.items():
        assert entry["failure"] is None, f"{name}: {entry['failure']}"
        assert len(entry["runs"]) == 1, name
        assert entry["median"]["rps"] > 0, f"{name} served nothing\n{table}"
        assert entry["errors"] == 0, f"{name} had failed requests/connections: {entry}\n{table}"
        assert len(entry["latency_c1"]["runs"]) == 1, name
        assert entry["latency_c1"]["median"]["p50_us"] > 0, name
        assert entry["upload"]["median_mib_s"] > 0, f"{name} uploaded nothing\n{table}"
        assert entry["download"]["median_mib_s"] > 0, f"{name} downloaded nothing\n{table}"
    assert systems["nginx"]["ratio_to_nginx"]["rps"] == pytest.approx(1.0)
    assert systems["shardgate"]["ratio_to_nginx"]["rps"] > 0
    assert systems["shardgate"]["latency_c1"]["added_p50_us"] is not None
    assert systems["shardgate"]["download"]["ratio_to_nginx"] > 0
    assert systems["direct"]["idle_connections"] is None
    for name in ("nginx", "shardgate"):
        idle = systems[name]["idle_connections"]
        assert idle["still_open"] == 500, f"{name}: {idle}"
        assert idle["rss_kb"] > 0 and idle["peak_kb"] >= idle["rss_kb"] > 0, f"{name}: {idle}"
    routing = report["micro"]["routing"]
    assert all(r["hot_us"] > 0 and r["cold_us"] > 0 for r in routing), routing
    assert report["micro"]["rebuild"]["pod_change_ms"] > 0
    verdicts = {t["key"]: t["verdict"] for t in report["targets"]}
    assert set(verdicts) >= {
        "rps_ratio",
        "p99_ratio",
        "added_latency",
        "upload_ratio",
        "download_ratio",
        "rss",
    }
    assert set(verdicts.values()) <= {"PASS", "MISS"}, verdicts
    assert status == 0, table
    for text in ("nginx", "shardgate", "direct (ref)", "added p50 us", "download MiB/s", "peak RSS MB"):
        assert text in table, text
