"""ShardRing against the contract's recipe; epoch digest; consistent-hashing properties."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uhashring import HashRing

from gateway.config import ShardConfig, parse_shard_config
from gateway.ring import ShardRing, config_epoch, ring_epoch_inputs
from gateway.router import owner_group
from gateway.topology import TopologyBuilder

Groups = Sequence[tuple[str, int]]


def make_config(groups: Groups, vnodes: int = 160) -> ShardConfig:
    return ShardConfig.model_validate(
        {
            "version": 1,
            "ring": {"vnodes": vnodes},
            "groups": [
                {"name": n, "weight": w, "endpoints": [f"10.0.0.{i}:80"]} for i, (n, w) in enumerate(groups)
            ],
        }
    )


def equal(*names: str) -> list[tuple[str, int]]:
    return [(name, 1) for name in names]


def recipe(config: ShardConfig) -> HashRing:
    """The contract's recipe, spelled out literally (no gateway code involved)."""
    nodes = {g.name: {"weight": g.weight, "vnodes": config.ring.vnodes} for g in config.groups}
    return HashRing(nodes=nodes, hash_fn="ketama")


def sample_keys(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_@.éü中"
    keys = [f"user-{i}" for i in range(count // 2)]
    keys += ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(count - len(keys))]
    return keys


KEYS = sample_keys(4000)

CONFIGS = {
    "three-equal": make_config(equal("group-1", "group-2", "group-3")),
    "weighted": make_config([("group-1", 1), ("group-2", 2), ("group-3", 5)]),
    "custom-vnodes": make_config(equal("a", "b", "c", "d"), vnodes=7),
    "one-group": make_config(equal("solo")),
    "heavy-vnodes": make_config([("x", 3), ("y", 1)], vnodes=400),
    # 40,960 points: the bucketed search uses its widest table (2^16 buckets).
    "sixty-four": make_config(equal(*(f"group-{i}" for i in range(64)))),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_owner_is_the_contract_recipe(name: str) -> None:
    config = CONFIGS[name]
    ring, reference = ShardRing(config), recipe(config)
    assert all(ring.owner(key) == reference.get_node(key) for key in KEYS)


def test_ring_epoch_inputs_are_the_recipe_nodes() -> None:
    config = CONFIGS["weighted"]
    assert ring_epoch_inputs(config) == {
        "group-1": {"weight": 1, "vnodes": 160},
        "group-2": {"weight": 2, "vnodes": 160},
        "group-3": {"weight": 5, "vnodes": 160},
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_owner_equals_uncached(name: str) -> None:
    config = CONFIGS[name]
    topology = TopologyBuilder().build(config)
    reference = recipe(config)
    for _ in range(2):  # the first pass fills the cache, the second reads it
        for key in KEYS[:1000]:
            found = owner_group(topology, key.encode())
            assert not isinstance(found, str)
            assert getattr(found, "name", None) == reference.get_node(key)
    assert topology.ring.misses == 1000
    assert topology.ring.hits == 1000


def test_cache_is_keyed_on_the_raw_header_value() -> None:
    ring = ShardRing(CONFIGS["three-equal"])
    assert ring.cached_owner(b"alice") is None
    ring.remember(b"alice", "group-2")
    assert ring.cached_owner(b"alice") == "group-2"
    assert ring.cached_owner(b" alice") is None
    assert (ring.hits, ring.misses) == (1, 2)
    assert ring.stats()["cache_entries"] == 1


def test_cache_is_bounded() -> None:
    ring = ShardRing(CONFIGS["three-equal"], cache_size=3)
    for index in range(10):
        ring.remember(f"k{index}".encode(), "group-1")
        assert ring.stats()["cache_entries"] <= 3
    assert ring.cached_owner(b"k9") == "group-1"


def test_stats_count_points() -> None:
    ring = ShardRing(CONFIGS["three-equal"])
    stats = ring.stats()
    assert stats["groups"] == 3
    assert stats["points"] == len(recipe(CONFIGS["three-equal"]).get_points()) == 3 * 160 * 4


# ---------------------------------------------------------------------------------------------
# epoch

IMPLICIT = """
version: 1
groups:
  - {name: group-1, endpoints: ["10.0.0.1:80"]}
  - {name: group-2, service: svc-2, port: http}
"""

REORDERED = """
groups:
  - endpoints: ["10.0.0.1:80"]
    name: group-1
  - port: http
    service: svc-2
    name: group-2
version: 1
routing: {reads: any, missing_key: reject}
"""

EXPLICIT = """
version: 1
routing:
  key_header: User-ID
  write_methods: [POST, PUT, PATCH, DELETE]
  operation_header: Operation-Type
  missing_key: reject
  reads: any
ring: {vnodes: 160}
groups:
  - {name: group-1, weight: 1, endpoints: ["10.0.0.1:80"]}
  - {name: group-2, weight: 1, service: svc-2, port: http}
"""


def test_epoch_is_a_short_hex_digest() -> None:
    epoch = config_epoch(parse_shard_config(IMPLICIT))
    assert len(epoch) == 16
    int(epoch, 16)


def test_epoch_ignores_key_order() -> None:
    assert config_epoch(parse_shard_config(IMPLICIT)) == config_epoch(parse_shard_config(REORDERED))


def test_epoch_ignores_write_method_order() -> None:
    first = EXPLICIT.replace("[POST, PUT, PATCH, DELETE]", "[DELETE, PATCH, PUT, POST]")
    assert config_epoch(parse_shard_config(first)) == config_epoch(parse_shard_config(EXPLICIT))


def test_epoch_with_explicit_defaults_other_than_write_methods() -> None:
    implicit = IMPLICIT.replace(
        "version: 1", "version: 1\nrouting: {write_methods: [POST, PUT, PATCH, DELETE]}"
    )
    assert config_epoch(parse_shard_config(implicit)) == config_epoch(parse_shard_config(EXPLICIT))


def test_epoch_same_with_defaults_filled_or_explicit() -> None:
    assert config_epoch(parse_shard_config(IMPLICIT)) == config_epoch(parse_shard_config(EXPLICIT))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("weight: 1, endpoints", "weight: 2, endpoints"),
        ("vnodes: 160", "vnodes: 161"),
        ("name: group-2", "name: group-9"),
        ("reads: any", "reads: owner"),
        ("key_header: User-ID", "key_header: Tenant-ID"),
        ("10.0.0.1:80", "10.0.0.2:80"),
        ("port: http", "port: 8080"),
    ],
)
def test_epoch_changes_with_the_config(old: str, new: str) -> None:
    assert old in EXPLICIT
    changed = EXPLICIT.replace(old, new)
    assert config_epoch(parse_shard_config(changed)) != config_epoch(parse_shard_config(EXPLICIT))


def test_epoch_is_reproducible_across_parses() -> None:
    epochs = {config_epoch(parse_shard_config(EXPLICIT)) for _ in range(3)}
    assert len(epochs) == 1


# ---------------------------------------------------------------------------------------------
# properties

NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
GROUP_NAMES = st.lists(NAMES, min_size=1, max_size=6, unique=True)
PROPERTY_KEYS = sample_keys(3000, seed=11)


def owners(config: ShardConfig, keys: Sequence[str]) -> list[str]:
    ring = ShardRing(config)
    return [ring.owner(key) for key in keys]


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.tuples(NAMES, st.integers(1, 5)), min_size=1, max_size=6, unique_by=lambda g: g[0]),
    vnodes=st.integers(1, 200),
    keys=st.lists(st.text(min_size=1, max_size=64), min_size=1, max_size=50),
)
def test_independent_rings_agree(groups: Groups, vnodes: int, keys: list[str]) -> None:
    first, second = ShardRing(make_config(groups, vnodes)), ShardRing(make_config(list(groups), vnodes))
    reference = recipe(make_config(groups, vnodes))
    for key in keys:
        assert first.owner(key) == second.owner(key) == reference.get_node(key)


@settings(max_examples=25, deadline=None)
@given(names=GROUP_NAMES, new=NAMES, vnodes=st.sampled_from([100, 160, 240]))
def test_adding_a_group_moves_only_to_it(names: list[str], new: str, vnodes: int) -> None:
    if new in names:
        new += "-new"
    before = owners(make_config(equal(*names), vnodes), PROPERTY_KEYS)
    after = owners(make_config(equal(*names, new), vnodes), PROPERTY_KEYS)
    moved = [(old, now) for old, now in zip(before, after, strict=True) if old != now]
    assert all(now == new for _, now in moved)
    expected = 1 / (len(names) + 1)
    assert abs(len(moved) / len(PROPERTY_KEYS) - expected) < 0.4 * expected


@settings(max_examples=25, deadline=None)
@given(names=st.lists(NAMES, min_size=2, max_size=7, unique=True), data=st.data())
def test_removing_a_group_moves_only_its_keys(names: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(names))
    before = owners(make_config(equal(*names)), PROPERTY_KEYS)
    after = owners(make_config(equal(*[n for n in names if n != gone])), PROPERTY_KEYS)
    for old, now in zip(before, after, strict=True):
        assert (old == now) if old != gone else (now != gone)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.tuples(NAMES, st.integers(1, 10)), min_size=1, max_size=8, unique_by=lambda g: g[0]),
    vnodes=st.integers(20, 300),
)
def test_share_by_group_sums_to_one(groups: Groups, vnodes: int) -> None:
    share = ShardRing(make_config(groups, vnodes)).share_by_group()
    assert list(share) == [name for name, _ in groups]
    assert all(value >= 0 for value in share.values())
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)


def test_share_by_group_matches_sampled_ownership() -> None:
    config = CONFIGS["weighted"]
    share = ShardRing(config).share_by_group()
    sampled = owners(config, KEYS)
    for name, fraction in share.items():
        assert sampled.count(name) / len(KEYS) == pytest.approx(fraction, abs=0.03)
    assert share["group-3"] > share["group-2"] > share["group-1"]


def test_unequal_weights_move_keys_between_existing_groups_too() -> None:
    """Recipe property worth knowing: ketama rescales every group's points by N/total weight,
    so with unequal weights adding a group also shifts keys between the old groups
    (``shardgate plan`` shows it). With equal weights it does not (property above)."""
    before = owners(make_config([("a", 1), ("b", 2)]), KEYS)
    after = owners(make_config([("a", 1), ("b", 2), ("c", 1)]), KEYS)
    between_old = [1 for old, now in zip(before, after, strict=True) if old != now and now != "c"]
    assert between_old
