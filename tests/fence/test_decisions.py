"""The fence's decision (``gateway.fence.decide``) on views made from shard states, and the
cross-check that the fence and the gateway name the same owner for every key."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from gateway.config import parse_shard_config
from gateway.fence import Accept, InFlight, Refuse, Verdict, decide
from gateway.offline import route
from gateway.router import Refusal, owner_group
from gateway.shardstate import Moving, View
from gateway.topology import TopologyBuilder
from tests.fence.conftest import (
    AFTER,
    BEFORE,
    GROUPS,
    GROWN,
    KEY_HEADER,
    OWN,
    Recipe,
    config_text,
    fencing,
    find_keys,
    key_of,
    moving_key,
    stable,
)

STABLE = View.of(stable(1, config_text()))
GROWING = View.of(fencing(2, config_text(), config_text(GROWN)))


def headers(fields: Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]) -> object:
    """A HeaderValues lookup over ``fields`` (names case-insensitive, values as raw bytes)."""
    pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
    raw = [(n.lower().encode(), v.encode() if isinstance(v, str) else v) for n, v in pairs]
    return lambda name: [value for field, value in raw if field == name]


def judge(
    view: View | None,
    method: str,
    fields: Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]] = (),
    *,
    confirmed: bool = True,
) -> Verdict:
    return decide(view, OWN, confirmed, method.encode(), headers(fields))  # type: ignore[arg-type]


def refused(verdict: Verdict) -> Refuse:
    assert isinstance(verdict, Refuse), verdict
    return verdict


# ---------------------------------------------------------------------------------------------
# stable


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_stable_own_key_is_accepted(method: str) -> None:
    key = key_of(OWN)
    assert judge(STABLE, method, {KEY_HEADER: key}) == Accept(key.encode())


@pytest.mark.parametrize("other", ["group-1", "group-3"])
def test_stable_other_groups_key_is_misdirected_with_its_owner(other: str) -> None:
    verdict = refused(judge(STABLE, "POST", {KEY_HEADER: key_of(other)}))
    assert (verdict.status, verdict.code, verdict.owner) == (421, "misdirected_write", other)
    assert not verdict.retry_after


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reads_pass_whoever_owns_the_key(method: str) -> None:
    for group in GROUPS:
        assert judge(STABLE, method, {KEY_HEADER: key_of(group)}) is None
    assert judge(STABLE, method) is None  # without a key too


def test_reads_pass_even_unconfirmed_and_before_any_view() -> None:
    assert judge(STABLE, "GET", {KEY_HEADER: key_of("group-1")}, confirmed=False) is None
    assert judge(None, "GET", confirmed=False) is None


def test_operation_header_makes_a_read_a_write_and_the_last_value_wins() -> None:
    other = key_of("group-1")
    verdict = refused(judge(STABLE, "GET", {KEY_HEADER: other, "Operation-Type": " Write\t"}))
    assert verdict.code == "misdirected_write"
    last_read = [(KEY_HEADER, other), ("Operation-Type", "write"), ("Operation-Type", "read")]
    assert judge(STABLE, "GET", last_read) is None
    last_write = [(KEY_HEADER, other), ("Operation-Type", "read"), ("Operation-Type", "write")]
    assert refused(judge(STABLE, "GET", last_write)).code == "misdirected_write"
    # ...and never turns a write into a read
    assert (
        refused(judge(STABLE, "POST", {KEY_HEADER: other, "Operation-Type": "read"})).code
        == "misdirected_write"
    )


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "missing_shard_key"),
        ({KEY_HEADER: ""}, "missing_shard_key"),
        ({KEY_HEADER: " \t"}, "missing_shard_key"),
        ({KEY_HEADER: "a" * 257}, "invalid_shard_key"),
        ({KEY_HEADER: b"bad\x01key"}, "invalid_shard_key"),
        ({KEY_HEADER: b"\xff\xfe"}, "invalid_shard_key"),
        ({KEY_HEADER: b"c1\xc2\x85control"}, "invalid_shard_key"),
        ([(KEY_HEADER, "user-1"), (KEY_HEADER.lower(), "user-1")], "invalid_shard_key"),
    ],
)
def test_missing_invalid_and_repeated_keys_are_400(fields: object, code: str) -> None:
    verdict = refused(judge(STABLE, "POST", fields))  # type: ignore[arg-type]
    assert (verdict.status, verdict.code, verdict.owner) == (400, code, None)


def test_the_key_header_is_the_configs_own() -> None:
    view = View.of(stable(1, config_text(key_header="Account-ID")))
    key = key_of(OWN)
    assert refused(judge(view, "POST", {KEY_HEADER: key})).code == "missing_shard_key"
    assert judge(view, "POST", {"account-id": key}) == Accept(key.encode())


def test_configured_write_methods_decide() -> None:
    view = View.of(stable(1, config_text(write_methods=["POST", "MERGE"])))
    other = key_of("group-1")
    assert judge(view, "PUT", {KEY_HEADER: other}) is None  # not a write under this config
    assert refused(judge(view, "MERGE", {KEY_HEADER: other})).code == "misdirected_write"


# ---------------------------------------------------------------------------------------------
# unconfirmed


@pytest.mark.parametrize("view", [STABLE, GROWING, None], ids=["stable", "fencing", "no-view"])
def test_unconfirmed_writes_get_503_with_retry_after(view: View | None) -> None:
    for fields in ({KEY_HEADER: key_of(OWN)}, {KEY_HEADER: key_of("group-1")}, {}):
        verdict = refused(judge(view, "POST", fields, confirmed=False))
        assert (verdict.status, verdict.code, verdict.retry_after) == (503, "shard_state_unconfirmed", True)


def test_before_any_view_the_default_rules_say_what_a_write_is() -> None:
    assert refused(judge(None, "DELETE", confirmed=True)).code == "shard_state_unconfirmed"
    assert refused(judge(None, "GET", {"Operation-Type": "write"})).code == "shard_state_unconfirmed"
    assert judge(None, "GET", {"Operation-Type": "read"}) is None


# ---------------------------------------------------------------------------------------------
# fencing


def test_fencing_moving_keys_get_421_shard_moving_with_the_target() -> None:
    key = moving_key(OWN, "group-4")
    verdict = refused(judge(GROWING, "POST", {KEY_HEADER: key}))
    assert (verdict.status, verdict.code, verdict.owner, verdict.retry_after) == (
        421,
        "shard_moving",
        "group-4",
        True,
    )
    # a key moving away from another group is moving too (nobody may write it)
    elsewhere = moving_key("group-1", "group-4")
    assert refused(judge(GROWING, "POST", {KEY_HEADER: elsewhere})).code == "shard_moving"


def test_fencing_keys_that_stay_are_accepted_or_misdirected_as_before() -> None:
    own = key_of(OWN)
    assert judge(GROWING, "PUT", {KEY_HEADER: own}) == Accept(own.encode())
    verdict = refused(judge(GROWING, "PUT", {KEY_HEADER: key_of("group-3")}))
    assert (verdict.code, verdict.owner) == ("misdirected_write", "group-3")


def test_fencing_decisions_follow_both_rings_for_many_keys() -> None:
    for i in range(3000):
        key = f"k{i}"
        verdict = judge(GROWING, "POST", {KEY_HEADER: key})
        before, after = BEFORE.owner(key), AFTER.owner(key)
        if before != after:
            assert isinstance(verdict, Refuse) and (verdict.code, verdict.owner) == ("shard_moving", after), (
                key
            )
        elif before == OWN:
            assert verdict == Accept(key.encode()), key
        else:
            assert isinstance(verdict, Refuse) and (verdict.code, verdict.owner) == (
                "misdirected_write",
                before,
            )


def test_fencing_a_routing_change_moves_every_key() -> None:
    view = View.of(fencing(3, config_text(), config_text(key_header="Account-ID")))
    assert view.every_key_moves
    for key in find_keys(lambda k: BEFORE.owner(k) == OWN, 20):
        verdict = refused(judge(view, "POST", {KEY_HEADER: key}))
        assert (verdict.code, verdict.owner) == ("shard_moving", OWN)  # same ring: it stays, later
    assert judge(view, "GET", {KEY_HEADER: key_of(OWN)}) is None


def test_while_fencing_the_lease_is_the_larger_of_the_two() -> None:
    assert STABLE.lease == 60.0
    assert View.of(fencing(2, config_text(lease=5), config_text(GROWN, lease=2))).lease == 5
    assert View.of(fencing(2, config_text(lease=2), config_text(GROWN, lease=7))).lease == 7


def test_in_flight_moving_counts_keys_moving_under_a_view() -> None:
    writes = InFlight()
    moving, staying = moving_key(), key_of(OWN)
    tickets = [writes.add(moving.encode()), writes.add(moving.encode()), writes.add(staying.encode())]
    assert (writes.count, writes.moving(STABLE), writes.moving(GROWING)) == (3, 0, 2)
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert (writes.count, writes.moving(GROWING)) == (2, 1)
    for ticket in tickets[1:]:
        ticket.release()
    assert (writes.count, writes.moving(GROWING)) == (0, 0)


# ---------------------------------------------------------------------------------------------
# the gateway's rule, the fence's rule and `shardgate route` agree


@pytest.mark.parametrize("weights", [{}, {"group-1": 3, "group-3": 2}], ids=["equal", "weighted"])
def test_the_fence_names_the_gateways_owner_and_the_recipes(weights: dict[str, int], tmp_path: Path) -> None:
    text = config_text(weights=weights)
    view = View.of(stable(1, text))
    topology = TopologyBuilder().build(parse_shard_config(text))
    recipe = Recipe(GROUPS, weights)
    keys = [f"user-{i}" for i in range(2000)] + [" padded\t", "ünïcödé", "a" * 256, "x:y/z", "Ключ"]
    path = f"{tmp_path}/shards.yaml"
    with open(path, "w") as handle:
        handle.write(text)
    out, err = io.StringIO(), io.StringIO()
    assert route(path, keys, out, err) == 0, err.getvalue()
    routed = dict(line.split("\t") for line in out.getvalue().splitlines())
    owned = 0
    for key in keys:
        raw = key.encode()
        fence_owner = view.write_owner(raw)
        gateway_owner = owner_group(topology, raw)
        assert not isinstance(fence_owner, Refusal | Moving) and not isinstance(gateway_owner, Refusal)
        assert fence_owner == gateway_owner.name == recipe.owner(key) == routed[key.strip(" \t")], key
        verdict = judge(view, "POST", {KEY_HEADER: raw})
        assert (verdict == Accept(raw)) == (fence_owner == OWN)
        owned += fence_owner == OWN
    assert 0 < owned < len(keys)


def test_before_its_first_view_the_fence_passes_only_safe_methods() -> None:
    # The config's write methods are unknown yet: a custom one must not pass as a read.
    for method in ("POST", "PUT", "PATCH", "DELETE", "MERGE", "PROPPATCH"):
        assert refused(judge(None, method, {KEY_HEADER: "u"})).code == "shard_state_unconfirmed", method
    for method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        assert judge(None, method, {KEY_HEADER: "u"}) is None, method
    assert refused(judge(None, "GET", {"Operation-Type": "write"})).code == "shard_state_unconfirmed"


def test_while_the_write_methods_change_a_write_under_either_config_is_moving() -> None:
    view = View.of(
        fencing(2, config_text(write_methods=["POST"]), config_text(write_methods=["POST", "PATCH"]))
    )
    assert view.every_key_moves
    key = key_of(OWN)
    # PATCH is a read under the config in force, a write under the next one: nobody takes it.
    verdict = refused(judge(view, "PATCH", {KEY_HEADER: key}))
    assert (verdict.status, verdict.code, verdict.retry_after) == (421, "shard_moving", True)
    assert refused(judge(view, "POST", {KEY_HEADER: key})).code == "shard_moving"
    assert judge(view, "GET", {KEY_HEADER: key}) is None
