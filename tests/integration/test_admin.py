"""The admin server: health, readiness, Prometheus metrics, ring and route debugging, drain."""

from __future__ import annotations

import http.client
import json
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    UpstreamFactory,
    group_of,
    http_request,
    unicode_padded_keys,
)
from tests.integration.upstream import wait_until
from tests.support import contract_ring

pytestmark = pytest.mark.timeout(60)

REQUESTS = "shardgate_requests_total"
DURATION = "shardgate_request_duration_seconds"


class Setup:
    def __init__(self, groups: list[GroupSpec]) -> None:
        self.groups = groups
        self.recipe = Recipe(groups)


@pytest.fixture(scope="module")
def setup(module_upstreams: UpstreamFactory) -> Setup:
    return Setup(
        [
            group_of("admin-1", module_upstreams("admin-1", 2), weight=2),
            group_of("admin-2", module_upstreams("admin-2", 2)),
        ]
    )


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    return module_gateway(setup.groups)


def test_healthz_and_readyz(gw: Gateway) -> None:
    status, _, _ = gw.admin_get("/healthz")
    assert status == 200
    status, _, _ = gw.admin_get("/readyz")
    assert status == 200
    status, _, _ = gw.admin_get("/no-such-admin-page")
    assert status == 404


def test_metrics_parse_and_count_requests(gw: Gateway, setup: Setup) -> None:
    status, headers, body = gw.admin_get("/metrics")
    assert status == 200
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "shardgate_requests" in families or REQUESTS in families, sorted(families)
    assert DURATION in families and families[DURATION].type == "histogram", sorted(families)
    assert "shardgate_config_reloads" in families or "shardgate_config_reloads_total" in families

    def snapshot() -> dict[str, float]:
        samples = gw.metrics()

        def total(name: str, **labels: str) -> float:
            return sum(
                s.value
                for s in samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        return {
            "w1": total(REQUESTS, group="admin-1", kind="write", code_class="2xx"),
            "w2": total(REQUESTS, group="admin-2", kind="write", code_class="2xx"),
            "r": total(REQUESTS, kind="read", code_class="2xx"),
            # A POST refused for a missing key is still a write (the method decides).
            "4xx": total(REQUESTS, kind="write", code_class="4xx"),
            "count": total(DURATION + "_count"),
        }

    before = snapshot()
    keys1 = setup.recipe.keys_owned_by("admin-1", 20, prefix="metric")
    keys2 = setup.recipe.keys_owned_by("admin-2", 10, prefix="metric")
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    try:
        for key in keys1 + keys2:
            assert http_request(conn, "POST", "/metric", {KEY_HEADER: key}, b"{}").status == 200
        for i in range(15):
            assert http_request(conn, "GET", f"/metric-read/{i}").status == 200
        for _ in range(3):
            assert http_request(conn, "POST", "/metric-nokey", {}, b"{}").status == 400
    finally:
        conn.close()

    want = {"w1": 20.0, "w2": 10.0, "r": 15.0, "4xx": 3.0}
    seen: list[dict[str, float]] = []

    def counted() -> bool:
        after = snapshot()
        seen.append(after)
        return (
            all(after[k] - before[k] >= v for k, v in want.items()) and after["count"] - before["count"] >= 45
        )

    assert wait_until(counted, 5.0, interval=0.1), (
        before,
        seen[-1],
        [s for s in gw.metrics() if s.name == REQUESTS and s.labels.get("code_class") == "4xx"],
    )
    after = seen[-1]
    # Exactly these requests, no double counting (nothing else talks to this gateway now).
    assert {k: after[k] - before[k] for k in want} == want


def test_debug_ring_describes_the_config(gw: Gateway, setup: Setup) -> None:
    ring = gw.debug_ring()
    assert isinstance(ring["epoch"], str) and ring["epoch"]
    assert [(g["name"], g["weight"]) for g in ring["groups"]] == [("admin-1", 2), ("admin-2", 1)]
    for group, spec in zip(ring["groups"], setup.groups, strict=True):
        assert sorted(p["address"] for p in group["pods"]) == sorted(spec.endpoints)
        assert {p["state"] for p in group["pods"]} == {"ready"}
    assert isinstance(ring["ring"], dict) and ring["ring"]
    assert ring["config"]["last_error"] is None


def test_debug_route_agrees_with_the_recipe(gw: Gateway, setup: Setup) -> None:
    epoch = gw.epoch()
    endpoints = {g.name: set(g.endpoints) for g in setup.groups}
    keys = [f"route-{i}" for i in range(200)] + ["ユーザー-1", "émile", "a b", "x&y=z", "k" * 256]
    for key in keys:
        doc = gw.route(key)
        owner = setup.recipe.owner(key)
        assert doc["key"] == key
        assert doc["group"] == owner, (key, doc)
        assert doc["epoch"] == epoch
        assert set(doc["ready_pods"]) == endpoints[owner]
    # The proxy agrees with its own debug endpoint.
    for key in keys[:50]:
        result = http_request(gw.port, "POST", "/route-check", {KEY_HEADER: key}, b"{}")
        assert result.header("X-Shard-Group") == gw.route(key)["group"]


@pytest.mark.parametrize("query", ["", "?key=", "?other=1"])
def test_debug_route_without_a_key_is_400(gw: Gateway, query: str) -> None:
    status, _headers, body = gw.admin_get("/debug/route" + query)
    assert status == 400, (status, body[:200])
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc


def test_sigterm_turns_readiness_off_and_the_gateway_serves_on_during_the_drain_delay(
    start_gateway: GatewayFactory, setup: Setup
) -> None:
    # A drain delay far longer than the test: the window is certain however loaded the machine
    # is (the fixture's own SIGTERM at teardown is a second signal, which exits at once).
    gw = start_gateway(setup.groups, env={"SHARDGATE_DRAIN_DELAY": "600", "SHARDGATE_GRACE_TIMEOUT": "3"})
    key = setup.recipe.keys_owned_by("admin-2", 1, prefix="drain")[0]
    keeper = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    try:
        first = http_request(keeper, "POST", "/pre-drain", {KEY_HEADER: key}, b"{}")
        assert first.status == 200 and first.header("Connection") != "close", first.headers
        gw.expect_exit = True
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: gw.admin_status("/readyz") == 503, 20, interval=0.05), (
            "/readyz must turn 503 on SIGTERM"
        )
        # Not ready, yet serving (endpoints controllers have not caught up yet): the kept-alive
        # connection and new ones, each response asking the client to reconnect elsewhere.
        during = http_request(keeper, "POST", "/during-drain", {KEY_HEADER: key}, b"{}")
        assert during.status == 200 and during.header("X-Shard-Group") == "admin-2", during.body[:200]
        assert "close" in (during.header("Connection") or "").lower(), during.headers
        for i in range(3):
            result = http_request(gw.port, "POST", f"/during-drain/{i}", {KEY_HEADER: key}, b"{}")
            assert result.status == 200, result.body[:200]
            assert "close" in (result.header("Connection") or "").lower(), result.headers
        assert gw.admin_status("/healthz") == 200, "liveness must stay 200 while draining"
        assert gw.admin_status("/readyz") == 503
        gw.assert_alive()
    finally:
        keeper.close()


def test_after_the_drain_delay_the_gateway_stops_and_exits_0(
    start_gateway: GatewayFactory, setup: Setup
) -> None:
    drain = 1.0
    gw = start_gateway(
        setup.groups, env={"SHARDGATE_DRAIN_DELAY": str(drain), "SHARDGATE_GRACE_TIMEOUT": "3"}
    )
    key = setup.recipe.keys_owned_by("admin-2", 1, prefix="drain")[0]
    assert http_request(gw.port, "POST", "/pre-drain", {KEY_HEADER: key}, b"{}").status == 200
    gw.expect_exit = True
    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0, gw.log_tail()
    # A lower bound only (a loaded machine can only make the exit later): the delay was waited.
    assert time.monotonic() - signalled >= drain - 0.05, "the drain delay was not honoured"
    log = gw.log_tail(200)
    assert "SIGTERM: draining for 1.0s" in log and '"message":"stopped"' in log, log


def test_debug_route_strips_only_spaces_and_tabs_like_the_data_plane(gw: Gateway, setup: Setup) -> None:
    ring = contract_ring({g.name: g.weight for g in setup.groups})
    for key in unicode_padded_keys(ring):
        served = http_request(gw.port, "POST", "/route-ws", {KEY_HEADER: key.encode()}, b"{}")
        assert served.status == 200, served.body[:200]
        assert served.header("X-Shard-Group") == setup.recipe.owner(key)
        doc = gw.route(key)
        assert (doc["key"], doc["group"]) == (key, setup.recipe.owner(key)), (key, doc)


def test_debug_ring_names_the_build_the_gateway_runs(gw: Gateway) -> None:
    """The running gateway loads the build this test run is about: its compiled modules when
    they are installed here (the main run), none with SHARDGATE_PURE_PYTHON=1 (the second run)."""
    from gateway import build

    reported = gw.debug_ring()["build"]
    if build.pure_python_requested():
        assert reported == {"compiled": [], "pure_python_requested": True}
        return
    expected = [name for name in build.listed_modules() if name not in build.uncompiled_modules()]
    assert set(expected) <= set(reported["compiled"]), reported
    assert "compiled modules: " in gw.log_tail(200)
