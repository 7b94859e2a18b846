"""Passive health with real processes (docs/contract.md "Health"): a group whose pods stopped
answers writes 503 shard_unavailable from the first request after the ejections (not 502 after
a connect attempt) while every read succeeds elsewhere; a pod answering 500s is ejected after
its 5th and the rest of its group serves; no request ever leaves its owner group."""

from __future__ import annotations

import threading

import pytest
from aiohttp import web

from tests.integration.conftest import (
    KEY_HEADER,
    GatewayFactory,
    Recipe,
    UpstreamFactory,
    all_requests,
    assert_json_error,
    group_of,
    http_request,
)
from tests.integration.upstream import wait_until
from tests.support import BackgroundAiohttp

pytestmark = pytest.mark.timeout(60)


def test_a_group_whose_pods_stopped_answers_writes_503_at_once_and_reads_go_elsewhere(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    down, up = upstreams("down", 2), upstreams("up", 2)
    groups = [group_of("down", down), group_of("up", up)]
    gw = start_gateway(groups)  # reads: any
    recipe = Recipe(groups)
    down_keys, up_keys = recipe.keys_owned_by("down", 30), recipe.keys_owned_by("up", 10)
    assert http_request(gw.port, "POST", "/w", {KEY_HEADER: down_keys[0]}, b"{}").status == 200
    for pod in down:
        pod.stop()

    def pooled_to_down() -> int:
        groups = gw.debug_ring()["groups"]
        return sum(p["connections"] for g in groups if g["name"] == "down" for p in g["pods"])

    # (A pooled connection the gateway has not yet seen closed would answer 502 without an
    # ejection: the pool notices the closes first.)
    assert wait_until(lambda: pooled_to_down() == 0, 10)

    answers = [http_request(gw.port, "POST", "/w", {KEY_HEADER: k}, b"{}") for k in down_keys]
    # The first finds both pods refusing (tried once each, then 502); from then on both are
    # ejected, and every write for the group is answered at once, never sent elsewhere.
    first, rest = answers[0], answers[1:]
    assert_json_error(first.status, first.headers, first.body, 502, "upstream_error")
    for answer in rest:
        assert_json_error(answer.status, answer.headers, answer.body, 503, "shard_unavailable")
        assert (answer.header("Retry-After"), answer.header("X-Shard-Group")) == ("1", "down")
    assert gw.metric("shardgate_pod_ejections_total", group="down", reason="connect_failure") == 2
    assert gw.metric("shardgate_upstream_connect_failures_total") == 2  # no attempt after them
    reads = [http_request(gw.port, "GET", "/r", {KEY_HEADER: k}).status for k in down_keys * 2]
    assert reads == [200] * len(reads)
    writes_up = [http_request(gw.port, "POST", "/w", {KEY_HEADER: k}, b"{}").status for k in up_keys]
    assert writes_up == [200] * len(writes_up)
    assert {r.group for r in all_requests(up) if r.method == "POST"} == {"up"}
    pods = next(g for g in gw.debug_ring()["groups"] if g["name"] == "down")["pods"]
    assert [p["health"] for p in pods] == ["ejected", "ejected"]
    assert all(p["last_ejection_reason"] == "connect_failure" and p["ejected_for"] > 0 for p in pods)


class FailingPod:
    """A pod that answers every request ``status`` (500: a database outage) and counts them."""

    def __init__(self, status: int = 500) -> None:
        self.status = status
        self.answered = 0
        self._lock = threading.Lock()
        self.server = BackgroundAiohttp(self._app, name="failing-pod")

    def _app(self) -> web.Application:
        async def fail(request: web.Request) -> web.Response:
            await request.read()
            with self._lock:
                self.answered += 1
            return web.json_response({"error": "database down"}, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fail)
        return app


def test_a_pod_answering_500s_is_ejected_after_its_5th_and_its_group_serves_on(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    failing = FailingPod()
    port = failing.server.start()
    try:
        healthy = upstreams.one("mixed", "mixed-ok")
        groups = [group_of("mixed", [f"127.0.0.1:{port}", healthy]), group_of("other", upstreams("other", 1))]
        gw = start_gateway(groups)
        keys = Recipe(groups).keys_owned_by("mixed", 60)
        statuses = [http_request(gw.port, "POST", "/w", {KEY_HEADER: k}, b"{}").status for k in keys]
        assert failing.answered == 5 and statuses.count(500) == 5, statuses
        assert statuses[-30:] == [200] * 30
        assert gw.metric("shardgate_pod_ejections_total", group="mixed", reason="consecutive_5xx") == 1
        served = {r.pod for r in healthy.requests() if r.method == "POST"}
        assert served == {"mixed-ok"} and len(healthy.requests()) == 55
        pod = next(
            p for g in gw.debug_ring()["groups"] for p in g["pods"] if p["address"].endswith(f":{port}")
        )
        assert (pod["health"], pod["last_ejection_reason"]) == ("ejected", "consecutive_5xx")
    finally:
        failing.server.stop()
