"""Shard config reloads: a changed file is picked up (poll and SIGHUP); a bad one never is."""

from __future__ import annotations

import http.client
import os
import signal

import pytest

from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    UpstreamFactory,
    all_requests,
    group_of,
    http_request,
    render_config,
)
from tests.integration.upstream import UpstreamServer, wait_until

pytestmark = pytest.mark.timeout(60)

RELOADS = "shardgate_config_reloads_total"


class Pods:
    def __init__(self, servers: list[UpstreamServer]) -> None:
        self.servers = servers

    def groups(self, count: int, weights: dict[str, int] | None = None) -> list[GroupSpec]:
        weights = weights or {}
        return [group_of(s.group, [s], weights.get(s.group, 1)) for s in self.servers[:count]]


@pytest.fixture(scope="module")
def pods(module_upstreams: UpstreamFactory) -> Pods:
    return Pods([module_upstreams.one(f"reload-{i}", f"reload-{i}-pod") for i in (1, 2, 3)])


def _route_writes(gw: Gateway, pods: Pods, recipe: Recipe, epoch: str, tag: str, count: int = 300) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    try:
        for i in range(count):
            key = f"{tag}-{i}"
            result = http_request(conn, "POST", f"/{tag}", {KEY_HEADER: key}, b"{}")
            assert result.status == 200, result.body[:200]
            owner = recipe.owner(key)
            echo = result.json()
            assert echo["group"] == owner, f"{key} went to {echo['group']}, the recipe says {owner}"
            assert result.header("X-Shard-Group") == owner
            epochs = [v for k, v in echo["headers"] if k.lower() == "x-shard-epoch"]
            assert epochs == [epoch]
    finally:
        conn.close()
    got = {r.group for r in all_requests(pods.servers, lambda r: r.path == f"/{tag}")}
    assert got == set(recipe.groups), f"keys did not cover every group: {got}"


def _wait_metric(gw: Gateway, result: str, above: float, timeout: float = 15.0) -> float:
    values: list[float] = []

    def reached() -> bool:
        values.append(gw.metric(RELOADS, result=result))
        return values[-1] > above

    assert wait_until(reached, timeout, interval=0.1), (
        f"{RELOADS}{{result={result!r}}} stayed at {values[-1] if values else None}\n{gw.log_tail()}"
    )
    return values[-1]


def test_new_group_is_picked_up_and_routed_by_the_recipe(start_gateway: GatewayFactory, pods: Pods) -> None:
    two = pods.groups(2)
    gw = start_gateway(two)
    old_epoch = gw.epoch()
    _route_writes(gw, pods, Recipe(two), old_epoch, "before")
    applied = gw.metric(RELOADS, result="applied")

    three = pods.groups(3)
    gw.write_config(render_config(three))
    new_epoch = gw.wait_for_epoch_change(old_epoch)
    ring = gw.debug_ring()
    assert [g["name"] for g in ring["groups"]] == ["reload-1", "reload-2", "reload-3"]
    _wait_metric(gw, "applied", applied)

    recipe = Recipe(three)
    _route_writes(gw, pods, recipe, new_epoch, "after")
    for i in range(100):
        key = f"after-{i}"
        route = gw.route(key)
        assert route["group"] == recipe.owner(key)
        assert route["epoch"] == new_epoch
    assert gw.alive()


def test_invalid_config_is_rejected_and_the_old_one_kept(start_gateway: GatewayFactory, pods: Pods) -> None:
    groups = pods.groups(2)
    gw = start_gateway(groups)
    epoch = gw.epoch()
    assert gw.debug_ring()["config"]["last_error"] is None
    rejected = gw.metric(RELOADS, result="rejected")

    # A schema error: weight 0 for the first group.
    bad = render_config(groups).replace("weight: 1", "weight: 0", 1)
    assert bad != render_config(groups)
    gw.write_config(bad)
    rejected = _wait_metric(gw, "rejected", rejected)
    ring = gw.debug_ring()
    assert ring["epoch"] == epoch, "an invalid config replaced the running one"
    last_error = ring["config"]["last_error"]
    assert isinstance(last_error, str), ring["config"]
    assert "groups.0.weight" in last_error or "groups[0].weight" in last_error, last_error
    assert gw.admin_get("/readyz")[0] == 200
    _route_writes(gw, pods, Recipe(groups), epoch, "still-old")

    # Not even YAML.
    gw.write_config("version: 1\ngroups: [unclosed\n  - : :\n")
    _wait_metric(gw, "rejected", rejected)
    assert gw.epoch() == epoch
    assert isinstance(gw.debug_ring()["config"]["last_error"], str)
    _route_writes(gw, pods, Recipe(groups), epoch, "still-old-2", count=60)

    # A valid config afterwards is applied as usual.
    three = pods.groups(3)
    gw.write_config(render_config(three))
    new_epoch = gw.wait_for_epoch_change(epoch)
    _route_writes(gw, pods, Recipe(three), new_epoch, "fixed", count=150)


def test_sighup_reloads_at_once(start_gateway: GatewayFactory, pods: Pods) -> None:
    groups = pods.groups(3)
    gw = start_gateway(groups)
    epoch = gw.epoch()

    # Rewrite the file in place with the same size and the old mtime, so that only the signal
    # (not a stat-based poll) can reveal the change: reload-2 gets weight 2.
    text = render_config(groups)
    reweighted = pods.groups(3, {"reload-2": 2})
    new_text = render_config(reweighted)
    assert len(new_text) == len(text)
    stat = os.stat(gw.config_path)
    with open(gw.config_path, "r+b") as handle:
        handle.write(new_text.encode())
    os.utime(gw.config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    gw.proc.send_signal(signal.SIGHUP)
    new_epoch = gw.wait_for_epoch_change(epoch, timeout=5.0)
    weights = {g["name"]: g["weight"] for g in gw.debug_ring()["groups"]}
    assert weights == {"reload-1": 1, "reload-2": 2, "reload-3": 1}
    _route_writes(gw, pods, Recipe(reweighted), new_epoch, "sighup", count=200)

    # SIGHUP with a broken file: rejected, visible, nothing else changes.
    rejected = gw.metric(RELOADS, result="rejected")
    gw.write_config("version: 2\ngroups: []\n")
    gw.proc.send_signal(signal.SIGHUP)
    _wait_metric(gw, "rejected", rejected, timeout=5.0)
    assert gw.epoch() == new_epoch
    last_error = gw.debug_ring()["config"]["last_error"]
    assert isinstance(last_error, str) and "version" in last_error, last_error
    assert gw.alive()
