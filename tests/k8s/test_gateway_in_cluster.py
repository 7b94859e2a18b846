"""The real gateway process against the API-server double, as it runs in a cluster.

``python -m gateway run --configmap shardgate --namespace shards`` with ``KUBECONFIG`` pointing at
``FakeApiServer``; shard groups are Services whose EndpointSlices list ``PodFarm`` pods
(127.0.0.N on one port, like pod IPs). Covered: routing follows endpoints, pods turning
not-ready / terminating / disappearing under a steady client, a group without ready pods,
ConfigMap edits (add a group, reweight, invalid YAML, invalid schema, deletion, absent at
start), and watch failures (dropped streams, 410 Gone, an API-server outage, 500s).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

import pytest

from gateway.shardstate import Phase, ShardState
from tests.k8s.apiserver import FakeApiServer
from tests.k8s.conftest import (
    CONFIGMAP,
    DEADLINE,
    NS,
    Client,
    GatewayFactory,
    GatewayProcess,
    Group,
    Recipe,
    Result,
    SteadyLoad,
    put_config,
    put_pods,
    shard_config,
    wait_for,
)
from tests.k8s.pods import PodFarm

# The gateway's watches: the desired-config ConfigMap, the shard-state ConfigMap (what it routes
# on, docs/design/014-ownership-handoff.md) and the groups' EndpointSlices.
WATCHES = 3


def hosts_of(farm: PodFarm, *indexes: int) -> list[str]:
    return [farm.hosts[i] for i in indexes]


def addr(farm: PodFarm, index: int) -> str:
    return farm.addresses[index]


def routes_follow(
    gw: GatewayProcess, client: Client, recipe: Recipe, members: dict[str, set[str]], keys: Sequence[str]
) -> bool:
    """Every key's write answers 200 from a pod of its owner group, as the recipe says."""
    for key in keys:
        owner = recipe.owner(key)
        result = client.write(key)
        if result.status != 200 or result.group != owner or result.pod not in members[owner]:
            return False
    return True


def assert_load_clean(load: SteadyLoad, recipe: Recipe, members: dict[str, set[str]]) -> None:
    """No failed request; every write went to (and was labelled with) its owner group."""
    sent = load.stop()
    assert sent, "the steady client sent nothing"
    failed = [s for s in sent if s.result.status != 200]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:5]}"
    for s in sent:
        if s.method == "POST":
            owner = recipe.owner(s.key)
            assert s.result.group == owner and s.result.pod in members[owner], s
        else:
            assert any(s.result.pod in pods for pods in members.values()), s


def assert_gets_no_new_requests(
    gw: GatewayProcess,
    farm: PodFarm,
    load: SteadyLoad,
    client: Client,
    victim: str,
    keys: Sequence[str],
    state: str | None,
) -> float:
    """Once /debug/ring shows ``victim`` in ``state`` (None: gone), it is never picked again.

    Returns how long the change took to show, from the call.
    """
    started = time.monotonic()
    assert wait_for(lambda: gw.pod_states().get(victim) == state), (victim, state, gw.pod_states())
    shown = time.monotonic() - started
    assert load.barrier(), "steady client stalled"  # whatever was routed before the swap is done
    before = farm.count(victim)
    assert load.barrier(40), "steady client stalled"
    for key in keys:
        result = client.write(key)
        assert result.status == 200 and result.pod != victim, (key, result)
    assert farm.count(victim) == before, f"{victim} ({state}) got {farm.count(victim) - before} new requests"
    return shown


# ---------------------------------------------------------------------------------------------
# Endpoints -> routing


@pytest.mark.timeout(60)
def test_routing_follows_endpoints_and_pods_leave_without_a_failed_request(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups = [Group("g-a", "svc-a"), Group("g-b", "svc-b")]
    recipe = Recipe(groups)
    members = {"g-a": set(farm.addresses[0:3]), "g-b": set(farm.addresses[3:5])}
    put_config(api, groups)
    gw = start_gateway()
    client = Client(gw.port)
    keys_a, keys_b = recipe.keys_of("g-a", 10), recipe.keys_of("g-b", 10)

    # The config is in force, the Services have no endpoints yet: writes are refused, not rerouted.
    result = client.write(keys_a[0])
    assert (result.status, result.error) == (503, "shard_unavailable"), result
    assert farm.total() == 0

    started = time.monotonic()
    put_pods(api, farm, "svc-a", hosts_of(farm, 0, 1, 2))
    put_pods(api, farm, "svc-b", hosts_of(farm, 3, 4))
    sample = keys_a[:5] + keys_b[:5]
    assert wait_for(lambda: routes_follow(gw, client, recipe, members, sample)), gw.pod_states()
    print(f"\nendpoints -> routing: {time.monotonic() - started:.3f}s")
    assert routes_follow(gw, client, recipe, members, keys_a + keys_b)
    hits = farm.hits()
    assert all(h.shard_group == recipe.owner(h.key or "") for h in hits if h.method == "POST"), hits

    victim, leaver = addr(farm, 0), addr(farm, 1)
    with SteadyLoad(gw.port, keys_a + keys_b) as load:
        # not ready
        put_pods(api, farm, "svc-a", {farm.hosts[0]: {"ready": False}, farm.hosts[1]: {}, farm.hosts[2]: {}})
        shown = assert_gets_no_new_requests(gw, farm, load, client, victim, keys_a, "not_ready")
        print(f"not-ready -> excluded: {shown:.3f}s")
        # ready again: it is picked again (the check above can see requests when there are some)
        count = farm.count(victim)
        put_pods(api, farm, "svc-a", hosts_of(farm, 0, 1, 2))
        assert wait_for(lambda: farm.count(victim) > count), gw.pod_states()
        # terminating, still serving (a draining pod): no new requests
        put_pods(
            api, farm, "svc-a",
            {farm.hosts[0]: {"ready": False, "serving": True, "terminating": True},
             farm.hosts[1]: {}, farm.hosts[2]: {}},
        )  # fmt: skip
        shown = assert_gets_no_new_requests(gw, farm, load, client, victim, keys_a, "terminating")
        print(f"terminating -> excluded: {shown:.3f}s")
        # a ready pod disappears from the slice at once (deleted pod)
        put_pods(
            api, farm, "svc-a",
            {farm.hosts[0]: {"ready": False, "serving": True, "terminating": True}, farm.hosts[2]: {}},
        )  # fmt: skip
        shown = assert_gets_no_new_requests(gw, farm, load, client, leaver, keys_a, None)
        print(f"removed -> excluded: {shown:.3f}s")
        # and the terminating one finally goes too
        put_pods(api, farm, "svc-a", hosts_of(farm, 2))
        assert_gets_no_new_requests(gw, farm, load, client, victim, keys_a, None)
        assert set(gw.pod_states()) == {addr(farm, 2), addr(farm, 3), addr(farm, 4)}
    assert_load_clean(load, recipe, members)
    assert all(h.shard_group == recipe.owner(h.key or "") for h in farm.hits() if h.method == "POST")


@pytest.mark.timeout(45)
def test_group_without_ready_pods_refuses_its_writes_and_never_reroutes(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups = [Group("g-a", "svc-a"), Group("g-b", "svc-b"), Group("g-c", "svc-c")]
    recipe = Recipe(groups)
    members = {
        "g-a": set(farm.addresses[0:2]),
        "g-b": set(farm.addresses[2:4]),
        "g-c": set(farm.addresses[4:6]),
    }
    put_config(api, groups)
    put_pods(api, farm, "svc-a", hosts_of(farm, 0, 1))
    put_pods(api, farm, "svc-b", hosts_of(farm, 2, 3))
    put_pods(api, farm, "svc-c", hosts_of(farm, 4, 5))
    gw = start_gateway()
    client = Client(gw.port)
    keys_c = recipe.keys_of("g-c", 20)
    others = recipe.keys_of("g-a", 5) + recipe.keys_of("g-b", 5)
    assert wait_for(lambda: routes_follow(gw, client, recipe, members, keys_c[:3] + others[:2]))

    with SteadyLoad(gw.port, others) as load:
        put_pods(api, farm, "svc-c", {farm.hosts[4]: {"ready": False}, farm.hosts[5]: {"ready": False}})
        assert wait_for(
            lambda: (
                gw.pod_states().get(addr(farm, 4)) == "not_ready"
                and gw.pod_states().get(addr(farm, 5)) == "not_ready"
            )
        ), gw.pod_states()
        assert load.barrier()
        before = len(farm.hits())
        for key in keys_c:
            result = client.write(key)
            assert (result.status, result.error) == (503, "shard_unavailable"), (key, result)
            assert result.retry_after is not None, result
            assert result.group in (None, "g-c"), result
            # PUT/DELETE and a read turned into a write are refused the same way
        for method in ("PUT", "DELETE"):
            assert client.request(method, keys_c[0]).status == 503
        # Reads (reads: any) of g-c's users may be served by any ready pod.
        read = client.read(keys_c[0])
        assert read.status == 200 and read.pod in members["g-a"] | members["g-b"], read
        assert gw.admin_json(f"/debug/route?key={keys_c[0]}")["ready_pods"] == []
        assert load.barrier(20)
        # Not a single write of g-c's keys reached any pod, of g-c or of another group.
        leaked = [h for h in farm.hits()[before:] if h.key in keys_c and h.method != "GET"]
        assert not leaked, leaked

        # A pod of g-c is ready again: g-c's writes go to it (and only to it).
        put_pods(api, farm, "svc-c", {farm.hosts[4]: {"ready": False}, farm.hosts[5]: {}})
        assert wait_for(lambda: client.write(keys_c[0]).status == 200)
        for key in keys_c:
            result = client.write(key)
            assert (result.status, result.pod, result.group) == (200, addr(farm, 5), "g-c"), result

        # A write in flight when its pod starts terminating is completed, not cut off.
        held: list[Result] = []
        writer = threading.Thread(
            target=lambda: held.append(Client(gw.port).request("POST", keys_c[0], "/hold"))
        )
        writer.start()
        assert wait_for(lambda: farm.hits(lambda h: h.path == "/hold") != [])
        draining = {"ready": False, "serving": True, "terminating": True}
        put_pods(api, farm, "svc-c", {farm.hosts[4]: {"ready": False}, farm.hosts[5]: draining})
        assert wait_for(lambda: gw.pod_states().get(addr(farm, 5)) == "terminating"), gw.pod_states()
        assert client.write(keys_c[1]).error == "shard_unavailable"
        farm.release()
        writer.join(DEADLINE)
        assert len(held) == 1 and (held[0].status, held[0].pod) == (200, addr(farm, 5)), held
    assert_load_clean(load, recipe, members)


# ---------------------------------------------------------------------------------------------
# ConfigMap edits


@pytest.mark.timeout(60)
def test_configmap_edits_add_reweight_reject_and_delete(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    three = [Group(f"g{i}", f"svc-{i}") for i in (1, 2, 3)]
    members = {f"g{i}": set(farm.addresses[2 * (i - 1) : 2 * i]) for i in (1, 2, 3, 4)}
    for i in (1, 2, 3, 4):  # svc-4's pods exist before the group is configured
        put_pods(api, farm, f"svc-{i}", hosts_of(farm, 2 * (i - 1), 2 * i - 1))
    put_config(api, three)
    gw = start_gateway()
    client = Client(gw.port)
    keys = [f"user-{n}" for n in range(300)]
    recipe3 = Recipe(three)
    assert all(gw.route(k) == recipe3.owner(k) for k in keys[:100])
    epoch3 = gw.epoch()
    assert gw.metric("shardgate_config_reloads_total", result="applied") == 1

    # Add a group: routing is the recipe over four groups; ~1/4 of the keys move, all to g4.
    four = [*three, Group("g4", "svc-4")]
    recipe4 = Recipe(four)
    put_config(api, four)
    assert wait_for(lambda: gw.epoch() != epoch3)
    epoch4 = gw.epoch()
    owners = {k: gw.route(k) for k in keys}
    assert owners == {k: recipe4.owner(k) for k in keys}
    moved = [k for k in keys if owners[k] != recipe3.owner(k)]
    assert all(owners[k] == "g4" for k in moved), [(k, owners[k]) for k in moved if owners[k] != "g4"]
    assert 0.12 <= len(moved) / len(keys) <= 0.40, len(moved)
    for key in moved[:20]:
        result = client.write(key)
        assert (result.status, result.group) == (200, "g4") and result.pod in members["g4"], result
    assert gw.metric("shardgate_config_reloads_total", result="applied") == 2
    assert gw.metric("shardgate_config_epoch_info", epoch=epoch4) == 1

    # Reweight g1: the recipe with the new weights.
    reweighted = [Group("g1", "svc-1", weight=3), *four[1:]]
    recipe_w = Recipe(reweighted)
    put_config(api, reweighted)
    assert wait_for(lambda: gw.epoch() != epoch4)
    good_epoch = gw.epoch()
    assert all(gw.route(k) == recipe_w.owner(k) for k in keys[:150])
    assert sum(recipe_w.owner(k) == "g1" for k in keys) > sum(recipe4.owner(k) == "g1" for k in keys)
    swaps = gw.metric("shardgate_topology_swaps_total")

    # Invalid YAML: rejected, visible, the last good config stays in force.
    put_config(api, "version: 1\ngroups:\n  - name: g1\n    service: [svc-1\n")
    assert wait_for(lambda: gw.metric("shardgate_config_reloads_total", result="rejected") == 1)
    status = gw.ring()["config"]
    assert "invalid YAML" in (status["last_error"] or ""), status
    assert gw.epoch() == good_epoch
    assert gw.admin_status("/readyz") == 200
    assert routes_follow(gw, client, recipe_w, members, keys[:10])

    # Invalid schema: rejected with the field path.
    bad = shard_config(reweighted).replace("weight: 1\n  service: svc-2", "weight: 0\n  service: svc-2")
    assert "weight: 0" in bad
    put_config(api, bad)
    assert wait_for(lambda: gw.metric("shardgate_config_reloads_total", result="rejected") == 2)
    status = gw.ring()["config"]
    assert "groups.1.weight" in (status["last_error"] or ""), status
    assert any(p.startswith("groups.1.weight") for p in status["problems"]), status
    assert gw.epoch() == good_epoch
    assert gw.metric("shardgate_config_epoch_info", epoch=good_epoch) == 1
    assert gw.metric("shardgate_topology_swaps_total") == swaps  # nothing was swapped in
    assert routes_follow(gw, client, recipe_w, members, keys[:10])

    # ConfigMap deleted: keep routing on the last good config, and say so.
    api.delete_configmap(NS, CONFIGMAP)
    assert wait_for(lambda: gw.metric("shardgate_config_reloads_total", result="missing") == 1)
    status = gw.ring()["config"]
    assert "deleted" in (status["note"] or ""), status
    assert gw.epoch() == good_epoch
    assert gw.admin_status("/readyz") == 200
    assert routes_follow(gw, client, recipe_w, members, keys[:10])

    # Re-created: applied again, the note is gone.
    put_config(api, reweighted)
    assert wait_for(lambda: gw.metric("shardgate_config_reloads_total", result="applied") == 4)
    status = gw.ring()["config"]
    assert status["note"] is None and status["last_error"] is None, status
    assert gw.epoch() == good_epoch


@pytest.mark.timeout(45)
def test_no_configmap_at_start_means_not_ready_until_it_is_created(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    gw = start_gateway(ready=False)
    assert wait_for(lambda: "not found" in (gw.ring()["config"]["note"] or ""))
    assert gw.admin_status("/readyz") == 503
    assert gw.ring()["epoch"] is None
    client = Client(gw.port)
    result = client.write("user-1")
    assert (result.status, result.error) == (503, "not_ready"), result
    assert gw.admin_status("/readyz") == 503  # still: nothing has arrived

    groups = [Group("g1", "svc-1"), Group("g2", "svc-2", port=farm.port)]  # port by number
    members = {"g1": set(farm.addresses[0:2]), "g2": set(farm.addresses[2:4])}
    put_pods(api, farm, "svc-1", hosts_of(farm, 0, 1))
    put_pods(api, farm, "svc-2", hosts_of(farm, 2, 3))
    put_config(api, groups)
    assert wait_for(lambda: gw.admin_status("/readyz") == 200)
    recipe = Recipe(groups)
    assert routes_follow(gw, client, recipe, members, [f"user-{n}" for n in range(20)])
    assert gw.ring()["config"]["note"] is None


# ---------------------------------------------------------------------------------------------
# Watch failures


def three_groups(api: FakeApiServer, farm: PodFarm) -> tuple[list[Group], dict[str, set[str]]]:
    groups = [Group(f"g{i}", f"svc-{i}") for i in (1, 2, 3)]
    for i in (1, 2, 3):
        put_pods(api, farm, f"svc-{i}", hosts_of(farm, 2 * (i - 1), 2 * i - 1))
    put_config(api, groups)
    return groups, {f"g{i}": set(farm.addresses[2 * (i - 1) : 2 * i]) for i in (1, 2, 3)}


def watch_totals(gw: GatewayProcess, field: str) -> int:
    return sum(int(w[field]) for w in gw.watches().values())


@pytest.mark.timeout(45)
def test_dropped_watch_streams_reconnect_and_pick_up_later_changes(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups, members = three_groups(api, farm)
    gw = start_gateway()
    assert api.wait_for_watches(WATCHES)
    assert watch_totals(gw, "reconnects") == 0
    epoch = gw.epoch()

    assert api.drop_watches() == WATCHES
    assert wait_for(lambda: all(w["reconnects"] >= 1 for w in gw.watches().values())), gw.watches()
    assert gw.metric("shardgate_discovery_reconnects_total") >= 2
    # Changes made after the drop arrive through the new watches.
    put_pods(api, farm, "svc-1", hosts_of(farm, 0, 1, 6))
    members["g1"].add(addr(farm, 6))
    reweighted = [Group("g1", "svc-1", weight=2), *groups[1:]]
    put_config(api, reweighted)
    assert wait_for(lambda: gw.pod_states().get(addr(farm, 6)) == "ready"), gw.pod_states()
    assert wait_for(lambda: gw.epoch() != epoch)
    assert all(w["up"] for w in gw.watches().values()), gw.watches()
    assert routes_follow(gw, Client(gw.port), Recipe(reweighted), members, [f"user-{n}" for n in range(30)])


@pytest.mark.timeout(45)
def test_410_gone_relists_and_keeps_routing(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups, members = three_groups(api, farm)
    gw = start_gateway()
    assert api.wait_for_watches(WATCHES)
    # Changes the gateway's watches do not see (other names, other Services) move the version on;
    # compacting the history then makes both watches' resume points too old.
    api.put_configmap(NS, "unrelated", {"x": "1"})
    api.put_endpointslice(NS, "unrelated-abc", "svc-unrelated", [], [])
    api.compact()
    lists_before = api.count(verb="list")
    assert api.drop_watches() == WATCHES
    assert wait_for(lambda: all(w["relists"] >= 1 for w in gw.watches().values())), gw.watches()
    assert wait_for(lambda: api.count(verb="list") >= lists_before + WATCHES)
    assert gw.metric("shardgate_discovery_relists_total") >= WATCHES
    # The re-listed state is in force and later changes still arrive.
    put_pods(api, farm, "svc-2", {farm.hosts[2]: {"ready": False}, farm.hosts[3]: {}})
    assert wait_for(lambda: gw.pod_states().get(addr(farm, 2)) == "not_ready"), gw.pod_states()
    members["g2"].discard(addr(farm, 2))
    assert routes_follow(gw, Client(gw.port), Recipe(groups), members, [f"user-{n}" for n in range(30)])
    assert gw.epoch() is not None


@pytest.mark.timeout(60)
def test_api_server_outage_routing_continues_and_changes_arrive_after(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups, members = three_groups(api, farm)
    recipe = Recipe(groups)
    gw = start_gateway()
    assert api.wait_for_watches(WATCHES)
    epoch = gw.epoch()
    keys = [f"user-{n}" for n in range(24)]
    client = Client(gw.port)
    assert routes_follow(gw, client, recipe, members, keys)
    resources = set(gw.watches())
    assert resources == {f"configmap/{CONFIGMAP}", f"configmap/{CONFIGMAP}-state", "endpointslices"}
    assert all(gw.metric("shardgate_discovery_watch_up", resource=r) == 1 for r in resources)

    with SteadyLoad(gw.port, keys) as load:
        outage = 10.0
        down_at = time.monotonic()
        api.set_down(True)
        assert wait_for(lambda: not any(w["up"] for w in gw.watches().values())), gw.watches()
        assert all(gw.metric("shardgate_discovery_watch_up", resource=r) == 0 for r in resources)
        # Changes made while the gateway cannot see them (the double still takes them).
        put_pods(api, farm, "svc-1", {farm.hosts[0]: {"ready": False}, farm.hosts[1]: {}})
        put_pods(api, farm, "svc-2", hosts_of(farm, 2, 3, 6))
        reweighted = [Group("g1", "svc-1", weight=2), *groups[1:]]
        put_config(api, reweighted)
        served = len(load.sent)
        # Through the outage: the last known topology keeps routing, the watches stay down.
        while time.monotonic() - down_at < outage:
            watches = gw.watches()
            assert not any(w["up"] for w in watches.values()), watches
            assert gw.epoch() == epoch
            assert gw.admin_status("/readyz") == 200
            time.sleep(0.25)  # pacing of the outage checks, not synchronisation
        assert len(load.sent) > served + 20, "the steady client did not keep going during the outage"
        assert not load.failures(), load.failures()[:5]
        assert all(gw.metric("shardgate_discovery_watch_up", resource=r) == 0 for r in resources)

        api.set_down(False)
        # Everything changed during the outage arrives after it.
        assert wait_for(lambda: gw.epoch() != epoch), gw.watches()
        assert wait_for(lambda: gw.pod_states().get(addr(farm, 6)) == "ready"), gw.pod_states()
        assert_gets_no_new_requests(
            gw, farm, load, client, addr(farm, 0), recipe.keys_of("g1", 5), "not_ready"
        )
        assert wait_for(lambda: all(w["up"] for w in gw.watches().values())), gw.watches()
        assert all(gw.metric("shardgate_discovery_watch_up", resource=r) == 1 for r in resources)
        # ... and so does what changes after it.
        put_pods(api, farm, "svc-3", {farm.hosts[4]: {}, farm.hosts[5]: {"ready": False}})
        assert_gets_no_new_requests(
            gw, farm, load, client, addr(farm, 5), recipe.keys_of("g3", 5), "not_ready"
        )
    recipe_w = Recipe(reweighted)
    members["g2"].add(addr(farm, 6))
    # The steady load's writes straddle the reweight, so check them against the ring in force
    # at the time: before the new epoch appeared, the old recipe; after, the new one.
    sent = load.stop()
    failed = [s for s in sent if s.result.status != 200]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:5]}"
    for s in sent:
        if s.method == "POST":
            owner = s.result.group
            assert owner in (recipe.owner(s.key), recipe_w.owner(s.key)), s
            assert s.result.pod in members[str(owner)], s
    assert watch_totals(gw, "reconnects") >= 2
    assert routes_follow(gw, client, recipe_w, members, keys)


@pytest.mark.timeout(45)
def test_a_view_past_its_lease_refuses_writes_serves_reads_and_recovers_when_confirmed(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    """A replica that cannot confirm its view of the shard state for ``fence_lease_seconds``
    refuses writes itself (its view may be stale: another replica may already route on a newer
    one), keeps serving reads and stays ready; the first read that succeeds ends it."""
    groups, members = three_groups(api, farm)
    lease = 2.0
    handoff = f"handoff: {{fence_lease_seconds: {lease}, barrier_timeout_seconds: 10}}\n"
    put_config(api, shard_config(groups) + handoff)
    gw = start_gateway()
    client = Client(gw.port)
    key = Recipe(groups).keys_of("g2", 1)[0]
    assert wait_for(lambda: client.write(key).status == 200)
    assert gw.metric("shardgate_shard_state_unconfirmed") == 0
    assert gw.ring()["config"]["state_confirmed"] is True

    api.set_down(True)
    down_at = time.monotonic()
    assert wait_for(lambda: client.write(key).status == 503), gw.log_tail()
    assert time.monotonic() - down_at >= lease - 0.5  # (the last confirmation was just before)
    refused = client.write(key)
    assert (refused.status, refused.error, refused.retry_after) == (503, "shard_state_unconfirmed", "1")
    read = client.read(key)
    assert read.status == 200 and read.pod in members["g2"] | members["g1"] | members["g3"], read
    assert gw.admin_status("/readyz") == 200  # reads go on: the Service keeps the replica
    assert gw.metric("shardgate_shard_state_unconfirmed") == 1
    assert gw.ring()["config"]["state_confirmed"] is False
    assert "refusing writes" in gw.log_tail(80)

    api.set_down(False)
    assert wait_for(lambda: client.write(key).status == 200), gw.log_tail()
    assert gw.metric("shardgate_shard_state_unconfirmed") == 0
    assert gw.ring()["config"]["state_confirmed"] is True


@pytest.mark.timeout(45)
def test_a_view_no_direct_read_has_confirmed_yet_is_not_ready_and_refuses_writes(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    """At the start, a view the watch brought (its list) but no GET has confirmed: /readyz 503,
    writes refused 503 shard_state_unconfirmed; the first GET that succeeds ends both."""
    groups, _ = three_groups(api, farm)
    state = ShardState(generation=1, phase=Phase.STABLE, config=shard_config(groups), since=time.time())
    api.put_configmap(NS, f"{CONFIGMAP}-state", {"state.json": state.to_json()})
    api.fail_requests(10**6, 503, verb="get")  # lists and watches work; direct reads do not
    gw = start_gateway(ready=False)
    client = Client(gw.port)
    key = Recipe(groups).keys_of("g1", 1)[0]
    assert wait_for(lambda: gw.ring()["config"]["generation"] == 1), gw.ring()["config"]
    status, body = gw.admin_get("/readyz")
    assert (status, json.loads(body)["status"]) == (503, "shard state not confirmed yet")
    refused = client.write(key)
    assert (refused.status, refused.error) == (503, "shard_state_unconfirmed"), refused
    assert client.read(key).status == 200
    assert gw.ring()["config"]["state_confirmed"] is False

    api.clear_failures()
    assert wait_for(lambda: gw.admin_status("/readyz") == 200), gw.log_tail()
    assert wait_for(lambda: client.write(key).status == 200)
    assert gw.ring()["config"]["state_confirmed"] is True


@pytest.mark.timeout(60)
def test_with_workers_the_replica_reports_the_generation_its_workers_route_on(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    """The hand-off's barrier reads a replica's Lease: with ``--workers`` it says the generation
    every worker has applied (not merely the supervisor's), and follows each new one."""
    groups, _ = three_groups(api, farm)
    gw = start_gateway(env={"SHARDGATE_WORKERS": "2", "SHARDGATE_IDENTITY": "gw-workers"})

    def reported() -> dict[str, str]:
        lease = api.get_object("leases", NS, f"{CONFIGMAP}-replica-gw-workers") or {}
        return dict((lease.get("metadata") or {}).get("annotations") or {})

    def generation() -> int:
        return int(gw.ring()["config"]["generation"])

    first = generation()
    assert wait_for(lambda: reported().get("shardgate.io/generation") == str(first)), reported()
    assert reported()["shardgate.io/moving-in-flight"] == "0"
    put_config(api, groups, reads="owner")  # moves no key: committed at once, a new generation
    assert wait_for(lambda: generation() > first), gw.ring()["config"]
    assert wait_for(lambda: reported().get("shardgate.io/generation") == str(generation())), reported()


@pytest.mark.timeout(45)
def test_injected_500s_are_retried_until_the_watches_recover(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    groups, members = three_groups(api, farm)
    gw = start_gateway()
    assert api.wait_for_watches(WATCHES)
    epoch = gw.epoch()
    requests_before = api.count()
    api.fail_requests(3, 500, verb="watch")
    assert api.drop_watches() == WATCHES
    # Three dropped streams plus three 500s: six failed attempts, each followed by a retry.
    assert wait_for(lambda: watch_totals(gw, "reconnects") >= WATCHES + 3), gw.watches()
    assert api.wait_for_watches(WATCHES)
    assert api.count() >= requests_before + 3 + WATCHES  # three refused, then the watches open again
    assert api.clear_failures() == 0  # all three were spent on the gateway's retries
    put_pods(api, farm, "svc-3", hosts_of(farm, 4, 5, 7))
    members["g3"].add(addr(farm, 7))
    reweighted = [*groups[:2], Group("g3", "svc-3", weight=2)]
    put_config(api, reweighted)
    assert wait_for(lambda: gw.pod_states().get(addr(farm, 7)) == "ready"), gw.pod_states()
    assert wait_for(lambda: gw.epoch() != epoch)
    assert wait_for(lambda: all(w["up"] for w in gw.watches().values())), gw.watches()
    assert routes_follow(gw, Client(gw.port), Recipe(reweighted), members, [f"user-{n}" for n in range(30)])


# ---------------------------------------------------------------------------------------------
# Read policies end to end


@pytest.mark.timeout(60)
def test_owner_preferred_reads_leave_the_owner_group_only_while_it_has_no_ready_pod(
    api: FakeApiServer, farm: PodFarm, start_gateway: GatewayFactory
) -> None:
    """``reads: owner-preferred``: the owner group if it has a ready pod, else any ready pod.
    Writes keep strict ownership throughout."""
    groups = [Group("g-a", "svc-a"), Group("g-b", "svc-b"), Group("g-c", "svc-c")]
    recipe = Recipe(groups)
    members = {
        "g-a": set(farm.addresses[0:2]),
        "g-b": set(farm.addresses[2:4]),
        "g-c": set(farm.addresses[4:6]),
    }
    group_of_pod = {pod: name for name, pods in members.items() for pod in pods}
    put_config(api, groups, reads="owner-preferred")
    put_pods(api, farm, "svc-a", hosts_of(farm, 0, 1))
    put_pods(api, farm, "svc-b", hosts_of(farm, 2, 3))
    put_pods(api, farm, "svc-c", hosts_of(farm, 4, 5))
    gw = start_gateway()
    client = Client(gw.port)
    keys_c = recipe.keys_of("g-c", 30, prefix="pref")
    others = recipe.keys_of("g-a", 10, prefix="pref") + recipe.keys_of("g-b", 10, prefix="pref")
    assert wait_for(lambda: routes_follow(gw, client, recipe, members, keys_c[:3] + others[:2]))
    assert gw.ring()["routing"]["reads"] == "owner-preferred", gw.ring()["routing"]

    def read_all(keys: Sequence[str]) -> list[tuple[str, Result]]:
        return [(key, client.read(key)) for key in keys]

    # The owner has ready pods: every read stays in it (reads: any would spread them).
    for key, result in read_all(keys_c + others):
        owner = recipe.owner(key)
        assert (result.status, result.group) == (200, owner) and result.pod in members[owner], (key, result)

    # g-c has no ready pod: its users' reads fall back to the other groups' ready pods; its
    # writes are refused, never rerouted; the other groups' reads still stay home.
    put_pods(api, farm, "svc-c", {farm.hosts[4]: {"ready": False}, farm.hosts[5]: {"ready": False}})
    assert wait_for(
        lambda: [gw.pod_states().get(addr(farm, i)) for i in (4, 5)] == ["not_ready", "not_ready"]
    ), gw.pod_states()
    hits_c = farm.count(addr(farm, 4)) + farm.count(addr(farm, 5))
    for key, result in read_all(keys_c):
        assert result.status == 200, (key, result)
        assert result.pod in members["g-a"] | members["g-b"], (key, result)
        assert result.group == group_of_pod[result.pod], (key, result)  # the serving pod's group
    for key, result in read_all(others):
        owner = recipe.owner(key)
        assert (result.status, result.group) == (200, owner) and result.pod in members[owner], (key, result)
    for key in keys_c[:10]:
        result = client.write(key)
        assert (result.status, result.error) == (503, "shard_unavailable"), (key, result)
    assert farm.count(addr(farm, 4)) + farm.count(addr(farm, 5)) == hits_c

    # One pod of g-c is ready again: its users' reads go back to it, and only to it.
    put_pods(api, farm, "svc-c", {farm.hosts[4]: {"ready": False}, farm.hosts[5]: {}})
    assert wait_for(lambda: gw.pod_states().get(addr(farm, 5)) == "ready"), gw.pod_states()
    for key, result in read_all(keys_c):
        assert (result.status, result.group, result.pod) == (200, "g-c", addr(farm, 5)), (key, result)
