"""Router: read/write classification, key validation, strict write ownership, pod choice."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import cycle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uhashring import HashRing

from gateway import router
from gateway.config import ShardConfig
from gateway.router import (
    MAX_KEY_BYTES,
    MISSING_KEY,
    NO_READY_POD,
    NOT_READY,
    Decision,
    Refusal,
    choose_pod,
    decide,
    is_write,
    owner_group,
)
from gateway.topology import DiscoveredPod, GroupView, Pod, PodState, Topology, TopologyBuilder

GROUPS = ("group-1", "group-2", "group-3")
READS = ("any", "owner", "owner-preferred")


def make_config(reads: str = "any", **routing: Any) -> ShardConfig:
    return ShardConfig.model_validate(
        {
            "version": 1,
            "routing": {"reads": reads, **routing},
            "groups": [{"name": name, "service": f"svc-{i}"} for i, name in enumerate(GROUPS)],
        }
    )


def pods_of(group_index: int, *states: PodState) -> list[DiscoveredPod]:
    return [DiscoveredPod(f"10.0.{group_index}.{i}", 8080, state) for i, state in enumerate(states)]


HEALTHY: dict[str, list[DiscoveredPod]] = {
    name: pods_of(i, PodState.READY, PodState.READY) for i, name in enumerate(GROUPS)
}


def topology(reads: str = "any", down: Sequence[str] = (), **routing: Any) -> Topology:
    """Every group has 2 ready pods, except the ``down`` ones (one not ready, one terminating)."""
    discovered: dict[str, list[DiscoveredPod]] = dict(HEALTHY)
    for name in down:
        discovered[name] = pods_of(GROUPS.index(name), PodState.NOT_READY, PodState.TERMINATING)
    return TopologyBuilder().build(make_config(reads, **routing), discovered)


RECIPE = HashRing(nodes={name: {"weight": 1, "vnodes": 160} for name in GROUPS}, hash_fn="ketama")


def recipe_owner(key: str) -> str:
    """The contract's recipe for this module's config (3 groups, weight 1, 160 vnodes)."""
    return RECIPE.get_node(key)


def key_owned_by(group: str, start: int = 0) -> str:
    return next(f"user-{i}" for i in range(start, start + 1000) if recipe_owner(f"user-{i}") == group)


def as_decision(result: Decision | Refusal) -> Decision:
    assert isinstance(result, Decision), result
    return result


def as_refusal(result: Decision | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# ---------------------------------------------------------------------------------------------
# classification


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH", b"DELETE"])
def test_write_methods_are_writes(method: bytes) -> None:
    assert is_write(topology(), method, None)
    assert is_write(topology(), method, b"read")  # a header never turns a write into a read


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"post"])
def test_other_methods_are_reads(method: bytes) -> None:
    assert not is_write(topology(), method, None)


@pytest.mark.parametrize("operation", [b"write", b"WRITE", b"Write", b" write\t", b"wRiTe"])
def test_operation_header_turns_a_read_into_a_write(operation: bytes) -> None:
    assert is_write(topology(), b"GET", operation)


@pytest.mark.parametrize("operation", [b"read", b"writes", b"w", b"", b"write,read", b"wr ite"])
def test_other_operation_values_keep_a_read(operation: bytes) -> None:
    assert not is_write(topology(), b"GET", operation)


def test_configured_write_methods_replace_the_defaults() -> None:
    custom = topology(write_methods=["POST", "PROPPATCH"])
    assert is_write(custom, b"PROPPATCH", None)
    assert not is_write(custom, b"PUT", None)


def test_operation_write_on_a_get_is_routed_as_a_write() -> None:
    key = key_owned_by("group-2")
    decision = as_decision(decide(topology(), b"GET", key.encode(), b"WRITE"))
    assert decision.is_write and decision.group == "group-2"
    assert {p.group for p in decision.candidates} == {"group-2"}


def test_no_topology_means_not_ready() -> None:
    assert decide(None, b"GET", None, None) is NOT_READY
    assert NOT_READY.status == 503 and NOT_READY.code == "not_ready"


# ---------------------------------------------------------------------------------------------
# the shard key


@pytest.mark.parametrize("raw", [None, b"", b"   ", b"\t \t"])
def test_write_without_a_key_is_refused(raw: bytes | None) -> None:
    refusal = as_refusal(decide(topology(), b"POST", raw, None))
    assert refusal is MISSING_KEY
    assert (refusal.status, refusal.code) == (400, "missing_shard_key")


@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize("raw", [None, b"", b"  "])
def test_read_without_a_key_goes_to_any_ready_pod(reads: str, raw: bytes | None) -> None:
    snapshot = topology(reads, down=["group-3"])
    decision = as_decision(decide(snapshot, b"GET", raw, None))
    assert not decision.is_write and decision.group is None
    assert decision.candidates == snapshot.ready
    assert {p.group for p in decision.candidates} == {"group-1", "group-2"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"a" * (MAX_KEY_BYTES + 1), "longer than 256 bytes"),
        ("é".encode() * 129, "longer than 256 bytes"),
        (b"a\x00b", "control characters"),
        (b"a\x1fb", "control characters"),
        (b"a\x7fb", "control characters"),
        (b"a\nb", "control characters"),
        (b"a\rb", "control characters"),
        (b"a\tb", "control characters"),
        ("é\x01".encode(), "control characters"),  # not ASCII: checked byte by byte
        ("é\x7f".encode(), "control characters"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"caf\xc3", "not valid UTF-8"),
        (b"\xc0\xaf", "not valid UTF-8"),
        (b"\xed\xa0\x80", "not valid UTF-8"),
        ("user-1".encode("utf-16"), "control characters"),
        ("a\u0080b".encode(), "control characters"),  # C1 controls, U+0080..U+009F
        ("a\u0085b".encode(), "control characters"),
        ("\u009f".encode(), "control characters"),
    ],
)
@pytest.mark.parametrize("method", [b"POST", b"GET"])
def test_invalid_keys_are_refused(raw: bytes, reason: str, method: bytes) -> None:
    refusal = as_refusal(decide(topology("owner"), method, raw, None))
    assert (refusal.status, refusal.code) == (400, "invalid_shard_key")
    assert reason in refusal.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"a" * MAX_KEY_BYTES,
        "é".encode() * 128,
        b" " * 10 + b"a" * MAX_KEY_BYTES + b"\t",
        "用户-42".encode(),
        "\u00a0alice\u00a0".encode(),  # Latin-1 letters and spaces are not C1 controls
        "\u00a0\u00bf\u00ff".encode(),
    ],
)
def test_keys_at_the_limits_are_accepted(raw: bytes) -> None:
    decision = as_decision(decide(topology(), b"POST", raw, None))
    assert decision.group == recipe_owner(raw.decode().strip(" \t"))


def test_invalid_keys_are_not_cached() -> None:
    snapshot = topology()
    for _ in range(2):
        assert isinstance(owner_group(snapshot, b"bad\x00key"), Refusal)
    assert snapshot.ring.stats()["cache_entries"] == 0


@pytest.mark.parametrize("padding", [(b" ", b""), (b"", b"\t"), (b"  \t", b" \t "), (b"\t\t", b"\t\t")])
def test_surrounding_whitespace_is_stripped_like_the_recipe(padding: tuple[bytes, bytes]) -> None:
    snapshot = topology()
    for index in range(200):
        key = f"user-{index}"
        raw = padding[0] + key.encode() + padding[1]
        found = owner_group(snapshot, raw)
        assert not isinstance(found, Refusal)
        assert found.name == recipe_owner(raw.decode().strip(" \t")) == recipe_owner(key)


def test_inner_spaces_are_part_of_the_key() -> None:
    snapshot = topology()
    found = owner_group(snapshot, b" john smith ")
    assert not isinstance(found, Refusal) and found.name == recipe_owner("john smith")


# ---------------------------------------------------------------------------------------------
# strict write ownership


@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH", b"DELETE"])
def test_write_goes_only_to_the_owner(reads: str, method: bytes) -> None:
    snapshot = topology(reads)
    for index in range(300):
        key = f"user-{index}"
        decision = as_decision(decide(snapshot, method, key.encode(), None))
        owner = recipe_owner(key)
        assert decision.is_write and decision.group == owner
        assert decision.candidates == snapshot.groups[owner].ready


@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize(("method", "operation"), [(b"POST", None), (b"DELETE", b"read"), (b"GET", b"write")])
def test_write_to_a_group_without_ready_pods_is_refused(
    reads: str, method: bytes, operation: bytes | None
) -> None:
    snapshot = topology(reads, down=["group-2"])
    key = key_owned_by("group-2")
    refusal = as_refusal(decide(snapshot, method, key.encode(), operation))
    assert (refusal.status, refusal.code, refusal.retry_after) == (503, "shard_unavailable", 1)
    assert "group-2" in refusal.detail


@pytest.mark.parametrize("reads", READS)
def test_write_to_a_group_without_any_pod_is_refused(reads: str) -> None:
    discovered = {name: pods for name, pods in HEALTHY.items() if name != "group-1"}
    snapshot = TopologyBuilder().build(make_config(reads), discovered)
    refusal = as_refusal(decide(snapshot, b"PUT", key_owned_by("group-1").encode(), None))
    assert refusal.code == "shard_unavailable" and refusal.retry_after


STATES = st.sampled_from([PodState.READY, PodState.NOT_READY, PodState.TERMINATING])


@settings(max_examples=60, deadline=None)
@given(
    reads=st.sampled_from(READS),
    states=st.fixed_dictionaries({name: st.lists(STATES, max_size=3) for name in GROUPS}),
    key=st.text(  # valid keys: no control character (C0, DEL, and since the contract says so, C1)
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_categories=("Cc",)),
        min_size=1,
        max_size=40,
    ),
    method=st.sampled_from([b"POST", b"PUT", b"PATCH", b"DELETE"]),
)
def test_writes_never_reach_another_group(
    reads: str, states: Mapping[str, list[PodState]], key: str, method: bytes
) -> None:
    discovered = {name: pods_of(i, *states[name]) for i, name in enumerate(GROUPS)}
    snapshot = TopologyBuilder().build(make_config(reads), discovered)
    owner = recipe_owner(key)
    result = decide(snapshot, method, key.encode(), None)
    if PodState.READY in states[owner]:
        decision = as_decision(result)
        assert decision.group == owner
        assert decision.candidates and all(p.group == owner and p.eligible for p in decision.candidates)
    else:
        assert as_refusal(result).code == "shard_unavailable"


# ---------------------------------------------------------------------------------------------
# read modes


def test_reads_any_go_to_every_ready_pod_even_with_a_key() -> None:
    snapshot = topology("any")
    decision = as_decision(decide(snapshot, b"GET", key_owned_by("group-1").encode(), None))
    assert not decision.is_write and decision.group is None
    assert decision.candidates == snapshot.ready and len(snapshot.ready) == 6


@pytest.mark.parametrize("reads", ["owner", "owner-preferred"])
def test_owner_reads_go_to_the_owner(reads: str) -> None:
    snapshot = topology(reads)
    decision = as_decision(decide(snapshot, b"GET", key_owned_by("group-3").encode(), None))
    assert (decision.is_write, decision.group) == (False, "group-3")
    assert decision.candidates == snapshot.groups["group-3"].ready


def test_owner_reads_are_refused_when_the_owner_is_down() -> None:
    snapshot = topology("owner", down=["group-3"])
    refusal = as_refusal(decide(snapshot, b"GET", key_owned_by("group-3").encode(), None))
    assert (refusal.status, refusal.code, refusal.retry_after) == (503, "shard_unavailable", 1)


def test_owner_preferred_reads_fall_back_to_any_ready_pod() -> None:
    snapshot = topology("owner-preferred", down=["group-3"])
    decision = as_decision(decide(snapshot, b"GET", key_owned_by("group-3").encode(), None))
    assert decision.group is None and decision.candidates == snapshot.ready
    assert {p.group for p in decision.candidates} == {"group-1", "group-2"}


@pytest.mark.parametrize("reads", READS)
def test_reads_with_no_ready_pod_anywhere(reads: str) -> None:
    snapshot = topology(reads, down=list(GROUPS))
    result = decide(snapshot, b"GET", None, None)
    assert result is NO_READY_POD
    assert (NO_READY_POD.status, NO_READY_POD.code, NO_READY_POD.retry_after) == (503, "shard_unavailable", 1)


# ---------------------------------------------------------------------------------------------
# choose_pod


def make_pods(*inflight: int) -> tuple[Pod, ...]:
    pods = tuple(Pod("group-1", f"10.0.0.{i}", 80) for i in range(len(inflight)))
    for pod, count in zip(pods, inflight, strict=True):
        pod.inflight = count
    return pods


class FixedRandom:
    """Stands in for ``random.random`` inside gateway.router: replays given values."""

    def __init__(self, values: Sequence[float]) -> None:
        self._values: Iterator[float] = cycle(values)

    def random(self) -> float:
        return next(self._values)


def test_choose_pod_prefers_fewer_inflight_of_two() -> None:
    busy, idle = make_pods(5, 0)
    assert all(choose_pod((busy, idle)) is idle for _ in range(50))
    assert all(choose_pod((idle, busy)) is idle for _ in range(50))


def test_choose_pod_never_picks_the_busiest_of_many() -> None:
    pods = make_pods(3, 9, 1, 4, 0)
    chosen = {choose_pod(pods) for _ in range(500)}
    assert pods[1] not in chosen
    assert pods[4] in chosen


def test_choose_pod_compares_the_two_sampled_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    pods = make_pods(7, 2, 0)
    monkeypatch.setattr(router, "_random", FixedRandom([0.0]).random)  # samples pods 0 and 1
    assert choose_pod(pods) is pods[1]


def test_choose_pod_breaks_ties_both_ways() -> None:
    pods = make_pods(1, 1)
    assert {choose_pod(pods) for _ in range(200)} == set(pods)


def test_choose_pod_spreads_ties_among_many_evenly() -> None:
    pods = make_pods(0, 0, 0, 0, 0)
    picks = Counter(choose_pod(pods) for _ in range(5000))
    assert set(picks) == set(pods)
    assert all(700 < count < 1300 for count in picks.values()), picks  # 1000 expected each


def test_choose_pod_honours_exclude() -> None:
    first, second, third = make_pods(0, 5, 9)
    assert all(choose_pod((first, second), exclude=first) is second for _ in range(20))
    assert {choose_pod((first, second, third), exclude=first) for _ in range(100)} == {second}
    assert choose_pod((first,), exclude=first) is None


def test_choose_pod_skips_pods_that_are_not_eligible() -> None:
    ready, draining = make_pods(5, 0)
    draining.state = PodState.TERMINATING
    assert all(choose_pod((ready, draining)) is ready for _ in range(20))
    assert all(choose_pod((draining, ready)) is ready for _ in range(20))
    assert choose_pod((draining,)) is None


def test_choose_pod_returns_none_when_nothing_is_left() -> None:
    assert choose_pod(()) is None
    first, second, third = make_pods(0, 0, 0)
    first.state, second.state, third.state = PodState.NOT_READY, PodState.REMOVED, PodState.TERMINATING
    assert choose_pod((first, second)) is None
    assert choose_pod((first, second, third)) is None
    assert choose_pod((first, third), exclude=second) is None


def test_choose_pod_with_one_eligible_after_exclude() -> None:
    first, second, third = make_pods(0, 0, 0)
    second.state = PodState.NOT_READY
    assert all(choose_pod((first, second, third), exclude=first) is third for _ in range(20))


def test_choose_pod_finds_the_last_eligible_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    pods = make_pods(0, 0, 0)
    pods[0].state, pods[1].state = PodState.NOT_READY, PodState.TERMINATING
    monkeypatch.setattr(router, "_random", FixedRandom([0.0]).random)  # samples pods 0 and 1
    assert choose_pod(pods) is pods[2]


def test_only_http_whitespace_is_stripped() -> None:
    """The gateway strips HTTP optional whitespace (SP, HTAB) only; other Unicode spaces such as
    NBSP stay part of the key (Python's bare ``str.strip()`` would remove them: see the report)."""
    found = owner_group(topology(), "\u00a0alice".encode())
    assert not isinstance(found, Refusal)
    assert found.name == recipe_owner("\u00a0alice")


# ---------------------------------------------------------------------------------------------
# A hand-off under way: moving keys belong to nobody, the others route as before


def handoff_topology(next_groups: Sequence[str], **next_routing: Any) -> tuple[Topology, Topology]:
    """The gateway's topology while fencing from GROUPS to ``next_groups``, and the next one."""
    from gateway.shardstate import Phase, ShardState, View

    def text(groups: Sequence[str], **routing: Any) -> str:
        document = {
            "version": 1,
            "routing": routing,
            "groups": [{"name": name, "service": f"svc-{i}"} for i, name in enumerate(groups)],
        }
        return ShardConfig.model_validate(document).model_dump_json(exclude_none=True)

    state = ShardState(
        generation=5,
        phase=Phase.FENCING,
        config=text(GROUPS),
        next=text(next_groups, **next_routing),
        since=0.0,
    )
    view = View.of(state)
    assert view.handoff is not None and view.incoming is not None
    builder = TopologyBuilder()
    fencing = builder.build(make_config(), HEALTHY)
    return (
        Topology(
            **{**{f: getattr(fencing, f) for f in fencing.__dataclass_fields__}, "handoff": view.handoff}
        ),
        view.incoming,
    )


def test_a_write_for_a_moving_key_is_refused_and_the_others_route_as_before() -> None:
    fencing, incoming = handoff_topology([*GROUPS, "group-4"])
    moved = stayed = 0
    for i in range(500):
        key = f"user-{i}".encode()
        before = owner_group(fencing, key)
        after = owner_group(incoming, key)
        assert isinstance(before, GroupView) and isinstance(after, GroupView)
        write = decide(fencing, b"POST", key, None)
        read = decide(fencing, b"GET", key, None)
        assert isinstance(read, Decision)  # reads never wait for a hand-off
        if before.name != after.name:
            moved += 1
            assert isinstance(write, Refusal) and (write.status, write.code, write.retry_after) == (
                503,
                "shard_moving",
                1,
            )
            assert write.group is None  # a moving key has no owner to name
        else:
            stayed += 1
            assert isinstance(write, Decision) and write.group == before.name
    assert moved > 50 and stayed > 250  # adding a fourth group moves about a quarter


def test_a_routing_change_moves_every_key() -> None:
    fencing, _ = handoff_topology(GROUPS, key_header="Account-ID")
    for i in range(50):
        verdict = decide(fencing, b"PUT", f"user-{i}".encode(), None)
        assert isinstance(verdict, Refusal) and verdict.code == "shard_moving"
    assert isinstance(decide(fencing, b"GET", b"user-1", None), Decision)


def test_a_request_that_the_next_config_makes_a_write_is_refused_while_the_rules_change() -> None:
    fencing, _ = handoff_topology(GROUPS, write_methods=["DELETE", "MERGE", "PATCH", "POST", "PUT"])
    verdict = decide(fencing, b"MERGE", b"user-1", None)  # a read under the config in force
    assert isinstance(verdict, Refusal) and (verdict.status, verdict.code) == (503, "shard_moving")
    assert isinstance(decide(fencing, b"GET", b"user-1", None), Decision)
