"""Smoke test of the benchmark harness (bench/run.py).

`test_bench_smoke` starts the real backends, nginx and shardgate, drives each with wrk for one
second and checks the JSON report. It needs nginx and wrk on the machine and is skipped without
them (it never installs anything: `--no-install`). The other tests check the harness's own pieces
(wrk output parsing, the generated shard config) and need no external tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run
from bench.systems import group_ports, render_shard_config
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


@pytest.mark.skipif(
    bool(MISSING),
    reason=f"benchmark smoke test needs {' and '.join(MISSING)} (apt-get install -y {' '.join(MISSING)})",
)
@pytest.mark.timeout(60)
def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "bench.json"
    status = run.main(
        [
            "--duration", "1",
            "--runs", "1",
            "--warmup", "0",
            "--systems", "nginx,shardgate",
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
        assert entry["errors"] == 0, f"{name} had failed requests: {entry['runs']}\n{table}"
    assert systems["nginx"]["ratio_to_nginx"]["rps"] == pytest.approx(1.0)
    assert systems["shardgate"]["ratio_to_nginx"]["rps"] > 0
    assert status == 0, table
    for name in ("nginx", "shardgate"):
        assert name in table
