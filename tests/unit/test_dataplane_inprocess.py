"""The data plane in-process (bench/dataplane.py's harness): a client connection and pooled
upstream connections on fake transports, no sockets. Runs on whichever build is loaded, so
``make test`` covers it compiled and, with ``SHARDGATE_PURE_PYTHON=1``, as plain Python."""

from __future__ import annotations

import pytest

from bench import dataplane


@pytest.mark.parametrize("shape", dataplane.SHAPES)
def test_keep_alive_posts_are_routed_forwarded_and_answered(shape: str) -> None:
    bench = dataplane.setup(shape)
    dataplane.check(bench)
    dataplane.drive(bench, 200)
    dataplane.check(bench)
    metrics = bench.ctx.metrics
    answered = sum(route.codes[1] for route in metrics.write_routes.values())
    assert answered == 202
    assert metrics.client_connections_open == 1 and not bench.client.closed
    # Every request went to its owner group's pods, over the pooled connections only.
    assert metrics.upstream_connects == 0
    topology = bench.ctx.holder.current
    assert topology is not None
    sent = sum(pod.requests for group in topology.groups.values() for pod in group.pods)
    assert sent == 202


def test_the_benchmark_reports_both_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert dataplane.main(["--requests", "50", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ingress" in out and "bare" in out and "us/request" in out
