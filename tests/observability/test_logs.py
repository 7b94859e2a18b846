"""The gateway's logs: JSON lines on stdout, an access-log policy, control-plane events once each.

The gateway's stdout and stderr go to its log file (``Gateway.log_path``); the tests read that
file. Absence of a line is proven with a later line that must be there: logging is synchronous
and in order within a process, so once the later line is in the file, the earlier one would be.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    KEY_HEADER,
    NO_EJECTION,
    Gateway,
    GatewayFactory,
    GroupSpec,
    HttpResult,
    Recipe,
    UpstreamFactory,
    group_of,
    http_request,
    render_config,
)
from tests.observability.conftest import read_log, wait_for, wait_for_log

pytestmark = pytest.mark.timeout(60)

ACCESS = "shardgate.access"
# The groups here have a dead pod, which a hand-off's barrier cannot ask: it counts as stopped
# two leases (and a margin) after the fence phase began. Short leases keep the reloads quick.
QUICK_HANDOFF = {"fence_lease_seconds": 1, "barrier_timeout_seconds": 6}


class Setup:
    def __init__(self, groups: list[GroupSpec], dead: str) -> None:
        self.groups = groups
        self.recipe = Recipe(groups)
        self.dead = dead
        self.live_key = self.recipe.keys_owned_by("l-1", 1, prefix="log-live")[0]
        self.dead_key = self.recipe.keys_owned_by("l-dead", 1, prefix="log-dead")[0]


@pytest.fixture(scope="module")
def setup(module_upstreams: UpstreamFactory) -> Setup:
    dead = module_upstreams.dead_port()
    groups = [group_of("l-1", module_upstreams("l-1", 2)), group_of("l-dead", [dead])]
    return Setup(groups, dead.address)


def rid() -> str:
    return "log-" + uuid.uuid4().hex


def send(gw: Gateway, method: str, path: str, key: str | None, request_id: str, **extra: str) -> HttpResult:
    headers = {"X-Request-ID": request_id, **extra}
    if key is not None:
        headers[KEY_HEADER] = key
    return http_request(gw.port, method, path, headers, b"{}" if method == "POST" else None)


def lines_for(gw: Gateway, request_id: str) -> list[dict[str, Any]]:
    return [e for e in read_log(gw).access() if e.get("request_id") == request_id]


def unexplained(entries: list[dict[str, Any]], slow_ms: float) -> list[dict[str, Any]]:
    """Access lines the default policy has no reason for: not an error and not slow. (A success
    the loaded machine stalled past the threshold is rightly logged; it is not held against it.)"""
    return [e for e in entries if e["status"] < 500 and e["duration_ms"] < slow_ms]


def assert_all_json(gw: Gateway) -> None:
    view = read_log(gw)
    assert view.not_json == [], view.not_json[:5]
    assert view.entries, "the gateway logged nothing at all"
    for entry in view.entries:
        assert {"ts", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), entry


# ---------------------------------------------------------------------------------------------
# Default policy: errors (and slow requests) only


@pytest.fixture(scope="module")
def default_gw(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    return module_gateway(setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION)


def test_log_lines_are_json_objects(default_gw: Gateway, setup: Setup) -> None:
    assert send(default_gw, "POST", "/orders", setup.live_key, rid()).status == 200
    assert_all_json(default_gw)
    started = [e for e in read_log(default_gw).by("shardgate") if "listening" in e["message"]]
    assert len(started) == 1, started


def test_default_logs_a_502_but_not_a_success(default_gw: Gateway, setup: Setup) -> None:
    ok_id, bad_id = rid(), rid()
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    ok = send(default_gw, "POST", "/orders", setup.live_key, ok_id)
    assert ok.status == 200
    bad = send(
        default_gw, "POST", "/orders/9?x=1", setup.dead_key, bad_id, traceparent=f"00-{trace_id}-{span_id}-01"
    )
    assert bad.status == 502
    assert bad.header("X-Request-ID") == bad_id

    view = wait_for_log(default_gw, lambda e: e.get("request_id") == bad_id)
    entries = [e for e in view.access() if e.get("request_id") == bad_id]
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["level"] == "warning"
    assert entry["status"] == 502
    assert entry["trace_id"] == trace_id
    assert entry["group"] == "l-dead"
    assert entry["pod"] == setup.dead
    assert entry["epoch"] == default_gw.epoch()
    assert entry["method"] == "POST"
    assert entry["path"] == "/orders/9"
    assert entry["kind"] == "write"
    assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0
    # The success was answered before the 502, so its line (if any) would be there already.
    assert unexplained([e for e in view.access() if e.get("request_id") == ok_id], 1000) == []


def test_gateway_answered_502_says_which_error(default_gw: Gateway, setup: Setup) -> None:
    bad_id = rid()
    assert send(default_gw, "POST", "/orders", setup.dead_key, bad_id).status == 502
    view = wait_for_log(default_gw, lambda e: e.get("request_id") == bad_id)
    entry = next(e for e in view.access() if e.get("request_id") == bad_id)
    assert entry.get("error") == "upstream_error", entry


def test_default_logs_a_slow_success_only_past_the_default_threshold(
    default_gw: Gateway, setup: Setup
) -> None:
    """The default threshold is 1 s: a 0.3 s request is not slow."""
    slow_id, marker = rid(), rid()
    assert send(default_gw, "GET", "/slow-headers?delay=0.3", None, slow_id).status == 200
    assert send(default_gw, "POST", "/orders", setup.dead_key, marker).status == 502
    view = wait_for_log(default_gw, lambda e: e.get("request_id") == marker)
    assert unexplained([e for e in view.access() if e.get("request_id") == slow_id], 1000) == []


# ---------------------------------------------------------------------------------------------
# SHARDGATE_ACCESS_LOG and SHARDGATE_SLOW_REQUEST_SECONDS


def test_access_log_all_logs_every_request(module_gateway: GatewayFactory, setup: Setup) -> None:
    gw = module_gateway(
        setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION, env={"SHARDGATE_ACCESS_LOG": "all"}
    )
    sent = {rid(): 200 for _ in range(4)}
    for request_id in sent:
        assert send(gw, "POST", "/orders", setup.live_key, request_id).status == 200
    refused = rid()
    assert send(gw, "POST", "/orders", None, refused).status == 400
    sent[refused] = 400
    read_id = rid()
    assert send(gw, "GET", "/catalog", None, read_id).status == 200
    sent[read_id] = 200
    wait_for_log(gw, lambda e: e.get("request_id") == read_id)
    access = read_log(gw).access()
    for request_id, status in sent.items():
        entries = [e for e in access if e.get("request_id") == request_id]
        assert len(entries) == 1, (request_id, entries)
        assert entries[0]["status"] == status
        assert entries[0]["level"] == "info"
    refusal = next(e for e in access if e.get("request_id") == refused)
    assert refusal["error"] == "missing_shard_key"
    assert refusal["group"] == "none"
    assert_all_json(gw)


def test_access_log_off_logs_no_request(module_gateway: GatewayFactory, setup: Setup) -> None:
    gw = module_gateway(
        setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION, env={"SHARDGATE_ACCESS_LOG": "off"}
    )
    assert send(gw, "POST", "/orders", setup.live_key, rid()).status == 200
    assert send(gw, "POST", "/orders", setup.dead_key, rid()).status == 502
    assert send(gw, "POST", "/orders", None, rid()).status == 400
    # A config reload is logged after those requests: once it is in, no access line came before.
    old = gw.epoch()
    gw.write_config(render_config(setup.groups, vnodes=100, handoff=QUICK_HANDOFF, health=NO_EJECTION))
    new = gw.wait_for_epoch_change(old)
    view = wait_for_log(gw, lambda e: new in e.get("message", ""))
    assert view.access() == []


def test_slow_request_is_logged(module_gateway: GatewayFactory, setup: Setup) -> None:
    gw = module_gateway(
        setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION, env={"SHARDGATE_SLOW_REQUEST_SECONDS": "0.2"}
    )
    fast_id, slow_id = rid(), rid()
    assert send(gw, "POST", "/orders", setup.live_key, fast_id).status == 200
    assert send(gw, "GET", "/slow-headers?delay=0.5", None, slow_id).status == 200
    view = wait_for_log(gw, lambda e: e.get("request_id") == slow_id)
    entries = [e for e in view.access() if e.get("request_id") == slow_id]
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["status"] == 200
    assert entry["duration_ms"] >= 500
    assert entry["path"] == "/slow-headers"
    assert entry["kind"] == "read"
    assert entry["group"] == "l-1"
    # A fast success (well, unless the machine stalled it past 0.2 s) is not logged.
    fast = [e for e in view.access() if e.get("request_id") == fast_id]
    assert unexplained(fast, 200) == [], fast


# ---------------------------------------------------------------------------------------------
# Control-plane events: once each, not per request and not per poll


def _requests_for(gw: Gateway, setup: Setup, seconds: float) -> int:
    """Requests sent back to back for ``seconds`` (longer than the file poll interval of 1 s)."""
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert send(gw, "POST", "/orders", setup.live_key, rid()).status == 200
        count += 1
    return count


def test_reload_and_rejection_are_each_logged_once(start_gateway: GatewayFactory, setup: Setup) -> None:
    gw = start_gateway(setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION)
    first = gw.epoch()
    gw.write_config(render_config(setup.groups, vnodes=120, handoff=QUICK_HANDOFF, health=NO_EJECTION))
    second = gw.wait_for_epoch_change(first)
    for _ in range(20):
        assert send(gw, "POST", "/orders", setup.live_key, rid()).status == 200

    bad = yaml.safe_load(render_config(setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION))
    bad["ring"]["vnodes"] = 0  # one problem: vnodes must be positive
    gw.write_config(yaml.safe_dump(bad))
    assert wait_for(lambda: bool(gw.debug_ring()["config"]["problems"]))
    problems = gw.debug_ring()["config"]["problems"]
    assert _requests_for(gw, setup, 1.3) > 0
    assert gw.epoch() == second, "a rejected config never replaces the good one"

    view = read_log(gw)
    reloads = [e for e in view.by("shardgate.topology") if second in e["message"]]
    assert len(reloads) == 1, reloads
    assert reloads[0]["level"] == "info"
    rejections = [e for e in view.by("shardgate.config") if "rejected" in e["message"]]
    assert len(rejections) == len(problems) >= 1, (rejections, problems)
    assert all(e["level"] == "error" for e in rejections)
    assert any("vnodes" in e["message"] for e in rejections), rejections
    assert unexplained(view.access(), 1000) == [], "successful requests are not logged by default"
    assert_all_json(gw)


# ---------------------------------------------------------------------------------------------
# --workers N


@pytest.fixture(scope="module")
def workers_gw(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    return module_gateway(
        setup.groups, handoff=QUICK_HANDOFF, health=NO_EJECTION, env={"SHARDGATE_WORKERS": "2"}
    )


def test_worker_log_lines_say_which_worker(workers_gw: Gateway, setup: Setup) -> None:
    request_id = rid()
    assert send(workers_gw, "POST", "/orders", setup.dead_key, request_id).status == 502
    view = wait_for_log(workers_gw, lambda e: e.get("request_id") == request_id)
    entry = next(e for e in view.access() if e.get("request_id") == request_id)
    assert entry.get("worker") in ("0", "1"), entry


def test_worker_reload_is_logged_once(workers_gw: Gateway, setup: Setup) -> None:
    old = workers_gw.epoch()
    workers_gw.write_config(render_config(setup.groups, vnodes=90, handoff=QUICK_HANDOFF, health=NO_EJECTION))
    new = workers_gw.wait_for_epoch_change(old)

    # Each worker logs in order: once both have an access line of the new epoch (request ids
    # carry a per-process prefix), whatever they logged on taking the new topology is in too.
    def both_workers_on_new_epoch() -> bool:
        result = http_request(workers_gw.port, "POST", "/orders", {KEY_HEADER: setup.dead_key}, b"{}")
        assert result.status == 502
        prefixes = {
            str(e["request_id"]).rsplit("-", 1)[0]
            for e in read_log(workers_gw).access()
            if e.get("epoch") == new
        }
        return len(prefixes) >= 2

    assert wait_for(both_workers_on_new_epoch, interval=0.01)
    reloads = [e for e in read_log(workers_gw).by("shardgate.topology") if new in e["message"]]
    assert len(reloads) == 1, reloads
