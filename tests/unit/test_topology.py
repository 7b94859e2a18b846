"""TopologyBuilder: Pod reuse, removal and states, ring reuse, snapshot contents."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.config import ShardConfig
from gateway.ring import config_epoch
from gateway.topology import DiscoveredPod, Pod, PodState, Topology, TopologyBuilder, TopologyHolder


def make_config(
    groups: Sequence[tuple[str, int]] = (("group-1", 1), ("group-2", 1)),
    vnodes: int = 160,
    **routing: Any,
) -> ShardConfig:
    """Service groups named as given, plus a fixed-endpoint group ``static``."""
    return ShardConfig.model_validate(
        {
            "version": 1,
            "routing": routing,
            "ring": {"vnodes": vnodes},
            "groups": [
                *({"name": name, "weight": weight, "service": f"svc-{name}"} for name, weight in groups),
                {"name": "static", "endpoints": ["127.0.0.1:9001", "[::1]:9002"]},
            ],
        }
    )


def pod(host: str, state: PodState = PodState.READY, name: str | None = None) -> DiscoveredPod:
    return DiscoveredPod(host, 8080, state, name)


def by_address(snapshot: Topology, group: str) -> dict[str, Pod]:
    return {p.address: p for p in snapshot.groups[group].pods}


# ---------------------------------------------------------------------------------------------
# pods


def test_pod_objects_are_reused_for_the_same_address() -> None:
    builder, config = TopologyBuilder(), make_config()
    first = builder.build(config, {"group-1": [pod("10.0.0.1"), pod("10.0.0.2")]})
    first_pod = by_address(first, "group-1")["10.0.0.1:8080"]
    first_pod.inflight = 3
    second = builder.build(config, {"group-1": [pod("10.0.0.2"), pod("10.0.0.1"), pod("10.0.0.3")]})
    again = by_address(second, "group-1")
    assert again["10.0.0.1:8080"] is first_pod and first_pod.inflight == 3
    assert again["10.0.0.2:8080"] is by_address(first, "group-1")["10.0.0.2:8080"]
    assert by_address(first, "static")["127.0.0.1:9001"] is by_address(second, "static")["127.0.0.1:9001"]


def test_pods_are_reused_across_config_changes() -> None:
    builder = TopologyBuilder()
    first = builder.build(make_config(), {"group-1": [pod("10.0.0.1")]})
    second = builder.build(make_config(reads="owner"), {"group-1": [pod("10.0.0.1")]})
    assert second.groups["group-1"].pods[0] is first.groups["group-1"].pods[0]


def test_same_address_in_two_groups_is_two_pods() -> None:
    snapshot = TopologyBuilder().build(
        make_config(), {"group-1": [pod("10.0.0.1")], "group-2": [pod("10.0.0.1")]}
    )
    one, two = snapshot.groups["group-1"].pods[0], snapshot.groups["group-2"].pods[0]
    assert one is not two
    assert (one.group, two.group) == ("group-1", "group-2")


def test_removed_pods_are_marked_removed() -> None:
    builder, config = TopologyBuilder(), make_config()
    first = builder.build(config, {"group-1": [pod("10.0.0.1"), pod("10.0.0.2")]})
    gone = by_address(first, "group-1")["10.0.0.2:8080"]
    kept = by_address(first, "group-1")["10.0.0.1:8080"]
    second = builder.build(config, {"group-1": [pod("10.0.0.1")]})
    assert gone.state is PodState.REMOVED and not gone.eligible
    assert kept.state is PodState.READY
    assert gone not in second.groups["group-1"].pods


def test_pods_of_a_removed_group_are_removed() -> None:
    builder = TopologyBuilder()
    first = builder.build(make_config(), {"group-2": [pod("10.0.0.5")]})
    victim = first.groups["group-2"].pods[0]
    second = builder.build(make_config(groups=[("group-1", 1)]), {"group-2": [pod("10.0.0.5")]})
    assert "group-2" not in second.groups
    assert victim.state is PodState.REMOVED


def test_a_pod_that_leaves_the_ready_set_keeps_its_object() -> None:
    builder, config = TopologyBuilder(), make_config()
    target = builder.build(config, {"group-1": [pod("10.0.0.1")]}).groups["group-1"].pods[0]
    draining = builder.build(config, {"group-1": [pod("10.0.0.1", PodState.TERMINATING)]})
    assert draining.groups["group-1"].pods == (target,)
    assert draining.groups["group-1"].ready == ()
    assert target.state is PodState.TERMINATING
    builder.build(config, {"group-1": []})
    assert target.state is PodState.REMOVED


def test_a_pod_that_comes_back_ready_is_eligible_again() -> None:
    builder, config = TopologyBuilder(), make_config()
    target = (
        builder.build(config, {"group-1": [pod("10.0.0.1", PodState.NOT_READY)]}).groups["group-1"].pods[0]
    )
    back = builder.build(config, {"group-1": [pod("10.0.0.1")]})
    assert back.groups["group-1"].ready == (target,) and target.eligible


def test_a_removed_pod_that_returns_is_a_new_pod() -> None:
    builder, config = TopologyBuilder(), make_config()
    old = builder.build(config, {"group-1": [pod("10.0.0.1")]}).groups["group-1"].pods[0]
    builder.build(config, {"group-1": []})
    new = builder.build(config, {"group-1": [pod("10.0.0.1")]}).groups["group-1"].pods[0]
    assert new is not old
    assert (old.state, new.state) == (PodState.REMOVED, PodState.READY)


def test_duplicate_endpoints_are_counted_once() -> None:
    twice = [pod("10.0.0.1", name="a"), pod("10.0.0.2"), pod("10.0.0.1", name="a")]
    snapshot = TopologyBuilder().build(make_config(), {"group-1": twice})
    assert [p.address for p in snapshot.groups["group-1"].pods] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert len(snapshot.groups["group-1"].ready) == 2
    assert len(snapshot.ready) == 2 + 2  # group-1 plus the two static endpoints


def test_ready_sets_follow_pod_states() -> None:
    found = [pod("10.0.0.1"), pod("10.0.0.2", PodState.NOT_READY), pod("10.0.0.3", PodState.TERMINATING)]
    snapshot = TopologyBuilder().build(make_config(), {"group-1": found})
    group = snapshot.groups["group-1"]
    assert len(group.pods) == 3
    assert [p.address for p in group.ready] == ["10.0.0.1:8080"]
    assert snapshot.groups["group-2"].pods == ()
    assert [p.address for p in snapshot.ready] == ["10.0.0.1:8080", "127.0.0.1:9001", "[::1]:9002"]


def test_pod_names_and_addresses() -> None:
    snapshot = TopologyBuilder().build(make_config(), {"group-1": [pod("10.0.0.1", name="writer-1-abc")]})
    only = snapshot.groups["group-1"].pods[0]
    assert (only.name, only.host, only.port, only.address) == (
        "writer-1-abc",
        "10.0.0.1",
        8080,
        "10.0.0.1:8080",
    )
    static = by_address(snapshot, "static")
    assert static["[::1]:9002"].host == "::1"


# ---------------------------------------------------------------------------------------------
# ring reuse


def test_ring_is_reused_when_only_pods_change() -> None:
    builder, config = TopologyBuilder(), make_config()
    first = builder.build(config, {"group-1": [pod("10.0.0.1")]})
    second = builder.build(config, {"group-1": [pod("10.0.0.2")], "group-2": [pod("10.0.0.3")]})
    assert second.ring is first.ring


def test_ring_is_reused_when_only_routing_or_sources_change() -> None:
    builder = TopologyBuilder()
    first = builder.build(make_config())
    second = builder.build(make_config(reads="owner", key_header="Tenant-ID"))
    assert second.ring is first.ring
    assert second.epoch != first.epoch


@pytest.mark.parametrize(
    "changed",
    [
        make_config(groups=[("group-1", 2), ("group-2", 1)]),
        make_config(groups=[("group-1", 1), ("group-2", 1), ("group-3", 1)]),
        make_config(groups=[("group-1", 1)]),
        make_config(groups=[("group-2", 1), ("group-1", 1)]),
        make_config(vnodes=100),
    ],
)
def test_ring_is_rebuilt_when_groups_weights_or_vnodes_change(changed: ShardConfig) -> None:
    builder = TopologyBuilder()
    first = builder.build(make_config())
    second = builder.build(changed)
    assert second.ring is not first.ring
    assert second.ring.groups == tuple(g.name for g in changed.groups)


# ---------------------------------------------------------------------------------------------
# snapshot contents


def test_snapshot_holds_the_forms_the_router_compares() -> None:
    config = make_config(
        key_header="User-ID", operation_header="Operation-Type", write_methods=["POST", "PUT"]
    )
    snapshot = TopologyBuilder().build(config)
    assert snapshot.key_header == b"user-id"
    assert snapshot.operation_header == b"operation-type"
    assert snapshot.write_methods == frozenset({b"POST", b"PUT"})
    assert snapshot.reads == "any"
    assert snapshot.epoch == config_epoch(config)
    assert snapshot.epoch_bytes == snapshot.epoch.encode()


def test_operation_header_can_be_off() -> None:
    assert TopologyBuilder().build(make_config(operation_header=None)).operation_header is None


def test_group_views_describe_their_source() -> None:
    snapshot = TopologyBuilder().build(make_config(groups=[("group-1", 3)]))
    assert snapshot.groups["group-1"].source == "service:svc-group-1"
    assert snapshot.groups["group-1"].weight == 3
    assert snapshot.groups["static"].source == "endpoints"
    assert list(snapshot.groups) == ["group-1", "static"]


def test_describe_is_json_ready() -> None:
    snapshot = TopologyBuilder().build(make_config(), {"group-1": [pod("10.0.0.1", name="w-1")]})
    described = json.loads(json.dumps(snapshot.describe(lambda p: (p.inflight, 2, 1))))
    assert described["epoch"] == snapshot.epoch
    assert [g["name"] for g in described["groups"]] == ["group-1", "group-2", "static"]
    assert described["groups"][0]["pods"][0] == {
        "address": "10.0.0.1:8080",
        "name": "w-1",
        "state": "ready",
        "inflight": 0,
        "connections": 2,
        "idle_connections": 1,
        "requests": 0,
        "health": "healthy",  # (no data plane: what the Pod says)
    }
    assert sum(described["ring"]["share"].values()) == pytest.approx(1.0, abs=1e-5)
    assert described["ring"]["vnodes"] == 160


def test_holder_swaps_and_notifies() -> None:
    holder, seen = TopologyHolder(), []
    holder.subscribe(seen.append)
    builder = TopologyBuilder()
    first, second = builder.build(make_config()), builder.build(make_config(reads="owner"))
    assert holder.current is None
    holder.swap(first)
    holder.swap(second)
    assert holder.current is second and holder.swaps == 2
    assert seen == [first, second]
