"""Pods come and go under load; pods close connections on their own schedule.

1. A rolling update of one shard group, as a Deployment does it (maxSurge 1, maxUnavailable 0):
   a replacement pod becomes ready, then an old pod turns terminating (EndpointSlice conditions
   ready=false, serving=true, terminating=true), then disappears; again for the next old pod.
   The gateway runs with ``--configmap`` against the API-server double, with several client
   loops sending writes and reads over keep-alive connections all along. No request fails,
   every write of the group's keys lands on a pod of that group, a terminating pod gets no
   new request, and requests already in flight to it complete.
2. A pod that closes idle keep-alive connections after 1 s (as many servers do) while the
   gateway keeps its pooled connections for 10 s: requests spaced right around that 1 s
   (and bursts) never fail, though the gateway's idle connections go stale under it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest

from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.integration.conftest import Recipe as StaticRecipe
from tests.integration.conftest import group_of
from tests.k8s.apiserver import FakeApiServer
from tests.k8s.conftest import GatewayFactory as KubeGatewayFactory
from tests.k8s.conftest import GatewayProcess, Group, Recipe, Sent, SteadyLoad, put_config, put_pods
from tests.lifecycle.conftest import (
    Background,
    ConnectionFailed,
    GatedPodFarm,
    TrackedConn,
    UpstreamSet,
    wait_for,
)

# ---------------------------------------------------------------------------------------------
# 1. Rolling update of a shard group


def slow_write(port: int, key: str, gate: str) -> tuple[int, str | None, str | None]:
    """A write held by the pod until ``gate`` opens: (status, X-Shard-Group, serving pod)."""
    with TrackedConn(port, timeout=60) as conn:
        resp = conn.request("POST", f"/gated?gate={gate}", key)
        doc = resp.json() if resp.status == 200 else {}
        return resp.status, resp.header("X-Shard-Group"), doc.get("pod")


class Rollout:
    """The EndpointSlice of one group's Service, edited as the Deployment controller would."""

    def __init__(self, api: FakeApiServer, farm: GatedPodFarm, service: str, hosts: Sequence[str]) -> None:
        self.api = api
        self.farm = farm
        self.service = service
        self.conditions: dict[str, dict[str, bool]] = {h: {} for h in hosts}
        self.publish()

    def publish(self) -> None:
        put_pods(self.api, self.farm, self.service, dict(self.conditions))

    def add_ready(self, host: str) -> None:
        self.conditions[host] = {}
        self.publish()

    def terminate(self, host: str) -> None:
        self.conditions[host] = {"ready": False, "serving": True, "terminating": True}
        self.publish()

    def remove(self, host: str) -> None:
        del self.conditions[host]
        self.publish()


def barrier_all(loads: Sequence[SteadyLoad], requests: int = 2) -> None:
    for load in loads:
        assert load.barrier(requests), "a client loop stalled"


def hold_a_write_on(
    farm: GatedPodFarm, port: int, keys: Sequence[str], victim: str, gate: str
) -> list[Background]:
    """Start held writes (one connection each) until one of them is in flight on ``victim``."""
    started: list[Background] = []
    for key in keys:
        started.append(Background(lambda k=key: slow_write(port, k, gate), name=f"held-{gate}"))
        count = len(started)
        assert wait_for(lambda n=count: len(farm.held(gate)) == n), "a held write never reached a pod"
        if any(h.pod == victim for h in farm.held(gate)):
            return started
    raise AssertionError(f"none of {len(started)} held writes went to {victim}: {farm.held(gate)}")


@pytest.mark.timeout(90)
def test_rolling_a_shard_group_under_load_fails_no_request(
    api_server: FakeApiServer, pod_farm: GatedPodFarm, kube_gateways: KubeGatewayFactory
) -> None:
    farm = pod_farm
    groups = [Group("g-a", "svc-a"), Group("g-b", "svc-b")]
    recipe = Recipe(groups)
    old_a, new_a = farm.hosts[0:2], farm.hosts[4:6]
    members = {"g-a": {farm.address(h) for h in [*old_a, *new_a]}, "g-b": set(farm.addresses[2:4])}
    put_config(api_server, groups)
    rollout = Rollout(api_server, farm, "svc-a", old_a)
    put_pods(api_server, farm, "svc-b", farm.hosts[2:4])
    gw: GatewayProcess = kube_gateways()
    initial = members["g-b"] | {farm.address(h) for h in old_a}
    assert wait_for(lambda: set(gw.pod_states()) == initial), gw.pod_states()

    keys_a, keys_b = recipe.keys_of("g-a", 24), recipe.keys_of("g-b", 12)
    held_keys = recipe.keys_of("g-a", 12, prefix="held")
    # Several client loops, each over its own kept-alive connection; writes and reads alternate.
    loads = [SteadyLoad(gw.port, keys_a[i::3] + keys_b[i::3]) for i in range(3)]

    def roll(round_: int, old: str, new: str) -> list[Background]:
        """Replace pod ``old`` by ``new``; returns the writes held (one at least on ``old``)."""
        victim, replacement, gate = farm.address(old), farm.address(new), f"round-{round_}"
        # maxSurge: the replacement is ready (and taking writes) before the old pod goes.
        count = farm.count(replacement)
        rollout.add_ready(new)
        assert wait_for(lambda: gw.pod_states().get(replacement) == "ready"), gw.pod_states()
        assert wait_for(lambda: farm.count(replacement) > count), "the replacement never got a request"
        # Requests in flight to the victim when it turns terminating (held by the pod).
        held = hold_a_write_on(farm, gw.port, held_keys, victim, gate)
        rollout.terminate(old)
        assert wait_for(lambda: gw.pod_states().get(victim) == "terminating"), gw.pod_states()
        barrier_all(loads)  # whatever was routed before the change has been answered
        before = farm.count(victim)
        barrier_all(loads, 60)
        assert farm.count(victim) == before, f"terminating {victim} got new requests"
        if round_ == 0:
            # As in a cluster: the pod finishes its in-flight requests while terminating.
            farm.open_gate(gate)
            assert wait_for(lambda: farm.answered(gate) == len(farm.held(gate)))
        rollout.remove(old)
        assert wait_for(lambda: victim not in gw.pod_states()), gw.pod_states()
        barrier_all(loads)
        if round_ == 1:
            # Harsher: the endpoint is gone while a request to it is still in flight.
            assert farm.answered(gate) == 0
            farm.open_gate(gate)
        return held

    started = time.monotonic()
    held: dict[str, list[Background]] = {}
    running: list[SteadyLoad] = []
    try:
        for load in loads:
            running.append(load)  # its thread starts first thing in __enter__
            load.__enter__()
        for round_, (old, new) in enumerate(zip(old_a, new_a, strict=True)):
            held[farm.address(old)] = roll(round_, old, new)
        for victim, backgrounds in held.items():
            answers = [b.result(30) for b in backgrounds]
            for status, group, pod in answers:
                assert (status, group) == (200, "g-a") and pod in members["g-a"], (status, group, pod)
            # The request in flight to the pod when it turned terminating was answered by it.
            assert victim in {pod for _, _, pod in answers}, (victim, answers)
        assert set(gw.pod_states()) == {farm.address(h) for h in new_a} | members["g-b"]
        barrier_all(loads, 20)
    finally:
        farm.open_gate("round-0")  # never leave a held request behind
        farm.open_gate("round-1")
        sent: list[Sent] = [s for load in running for s in load.stop()]
    elapsed = time.monotonic() - started
    print(f"\nrollout: {len(sent)} requests in {elapsed:.1f}s ({len(sent) / elapsed:.0f}/s)")

    failed = [s for s in sent if s.result.status != 200]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:5]}"
    assert len(sent) >= 300, f"too little load to mean anything: {len(sent)} requests"
    for s in sent:
        if s.method == "POST":
            owner = recipe.owner(s.key)
            assert s.result.group == owner and s.result.pod in members[owner], s
    # What the pods received: every write of g-a's keys was labelled g-a and served by a g-a pod.
    writes_a = farm.hits(lambda h: h.method == "POST" and recipe.owner(h.key or "") == "g-a")
    assert len(writes_a) > 100, len(writes_a)
    wrong = [h for h in writes_a if h.pod not in members["g-a"] or h.shard_group != "g-a"]
    assert not wrong, wrong[:5]


# ---------------------------------------------------------------------------------------------
# 2. Upstreams that close idle keep-alive connections


@pytest.mark.timeout(60)
def test_upstream_closing_idle_connections_after_1s_fails_no_request(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pods = [upstreams("g-a", "a-1", idle_close=1.0), upstreams("g-b", "b-1", idle_close=1.0)]
    groups = [group_of("g-a", [pods[0].address]), group_of("g-b", [pods[1].address])]
    recipe = StaticRecipe(groups)
    # The gateway keeps idle upstream connections well past the pods' 1 s: they go stale in its pool.
    gw = static_gateways(groups, env={"SHARDGATE_UPSTREAM_IDLE_TIMEOUT": "10"})
    keys = recipe.keys_owned_by("g-a", 3) + recipe.keys_owned_by("g-b", 3)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # 14 pauses of 0.9-1.1 s (around the pods' idle close), with a burst of 4 after every 4th.
    pauses: list[float] = []
    for i in range(14):
        pauses.append(rng.uniform(0.9, 1.1))
        if i % 4 == 3:
            pauses += [0.0] * 4
    results: list[tuple[int, str, str, float, int | str]] = []
    with TrackedConn(gw.port) as conn:
        for i, pause in enumerate(pauses):
            if pause:
                time.sleep(pause)  # the spacing under test, not a synchronisation
            method, key = ("POST" if i % 2 == 0 else "GET"), keys[i % len(keys)]
            try:
                resp = conn.request(method, "/orders", key)
            except ConnectionFailed as exc:
                results.append((i, method, key, pause, f"client error: {exc}"))
                break  # the connection is gone; what happened is recorded
            doc = resp.json() if resp.status == 200 else {}
            results.append((i, method, key, pause, resp.status))
            if method == "POST" and resp.status == 200:
                owner = recipe.owner(key)
                assert doc["group"] == owner and doc["shard_group"] == owner, (key, doc)

    failed = [r for r in results if r[4] != 200]
    assert not failed, f"seed {seed}: {failed} (gateway log:\n{gw.log_tail()})"
    assert len(results) == len(pauses) == 26
    idle_closed = sum(p.idle_closed for p in pods)
    opened = sum(p.connections_opened for p in pods)
    print(f"\nidle closes by the pods: {idle_closed}; upstream connections opened: {opened}")
    assert idle_closed >= 5, "the pods never closed an idle connection: the test proves nothing"
    # The gateway did pool and reuse connections (the bursts), so stale ones were in its pool.
    per_conn: dict[tuple[str, int], int] = {}
    for hit in upstreams.hits():
        per_conn[(hit.pod, hit.conn)] = per_conn.get((hit.pod, hit.conn), 0) + 1
    assert max(per_conn.values()) >= 2, per_conn
    assert len(upstreams.hits()) == len(results)  # every request reached a pod exactly once
