"""Offline commands: ``validate``, ``route`` and ``plan``; no network, no Kubernetes.

Each command is a function that writes to the streams it is given and returns the process exit
code, so tests call them directly. ``route`` goes through the router's own key handling, so it
prints exactly what a gateway with the same config would do; ``plan`` computes what a config
change moves exactly, from the two ketama continua rather than by sampling keys.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from uhashring import HashRing

from gateway.config import ConfigError, ShardConfig, parse_shard_config
from gateway.ring import config_epoch, ring_epoch_inputs
from gateway.router import MISSING_KEY, Refusal, invalid_key, owner_group
from gateway.topology import TopologyBuilder

HASH_SPACE = 2**32  # ketama positions are 32-bit
OWS = " \t"  # what the router strips around a key (HTTP optional whitespace)
INVALID_UTF8 = invalid_key("shard key is not valid UTF-8")


def load(path: str) -> ShardConfig:
    """Read and validate one shard config file; problems are ``field.path: reason``."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"(file): cannot read: {exc.strerror or exc}"]) from None
    return parse_shard_config(text)


def _load_or_report(path: str, err: TextIO) -> ShardConfig | None:
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=err)
        return None


# ---------------------------------------------------------------------------------------------
# validate


def ring_points(config: ShardConfig) -> Counter[str]:
    """Points each group gets on the contract's ketama continuum."""
    ring = HashRing(nodes=ring_epoch_inputs(config), hash_fn="ketama")
    return Counter(name for _, name in ring.get_points())


def summary(path: str, config: ShardConfig) -> str:
    groups = config.groups
    services = sum(1 for g in groups if g.service is not None)
    sources = [f"{len(groups) - services} with endpoints"] if len(groups) > services else []
    if services:
        sources.append(f"{services} with a service")
    return (
        f"OK {path}: {len(groups)} groups ({', '.join(sources)}), vnodes {config.ring.vnodes},"
        f" reads {config.routing.reads}, epoch {config_epoch(config)}"
    )


def pointless_groups(config: ShardConfig) -> list[str]:
    """Warnings for groups that the ketama weighting leaves without a single ring point."""
    points = ring_points(config)
    return [
        f"groups.{index}.weight: group {group.name!r} gets no ring points (ring.vnodes x groups x"
        f" weight < total weight), so it owns no key; raise ring.vnodes or its weight"
        for index, group in enumerate(config.groups)
        if points[group.name] == 0
    ]


def validate(path: str, out: TextIO, err: TextIO) -> int:
    """Exit 0 and one summary line for a valid config; 1 and one line per problem otherwise."""
    config = _load_or_report(path, err)
    if config is None:
        return 1
    for warning in pointless_groups(config):
        print(f"warning: {path}: {warning}", file=err)
    print(summary(path, config), file=out)
    return 0


# ---------------------------------------------------------------------------------------------
# route


def _key_bytes(key: str) -> bytes | None:
    """The bytes a client would have sent (argv undecodable bytes come back as surrogates)."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def route(path: str, keys: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Print ``KEY<TAB>GROUP`` per key, exactly as the gateway's router would decide."""
    config = _load_or_report(path, err)
    if config is None:
        return 1
    topology = TopologyBuilder().build(config)
    status = 0
    for key in keys:
        raw = _key_bytes(key)
        found = owner_group(topology, raw) if raw is not None else INVALID_UTF8
        if isinstance(found, Refusal):
            detail = "the key is empty" if found is MISSING_KEY else found.detail
            print(f"{key!r}: {found.code}: {detail}", file=err)
            status = 1
            continue
        print(f"{key.strip(OWS)}\t{found.name}", file=out)
    return status


# ---------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class Continuum:
    """Sorted ketama positions and the group owning each; a hash h belongs to the first
    position strictly above it (wrapping to the first), as uhashring's ``bisect`` does."""

    positions: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, config: ShardConfig) -> Continuum:
        points = HashRing(nodes=ring_epoch_inputs(config), hash_fn="ketama").get_points()
        return cls(tuple(p for p, _ in points), tuple(n for _, n in points))

    def owner_at(self, position: int) -> str:
        index = bisect_right(self.positions, position)
        return self.names[index % len(self.positions)]


def movement(old: ShardConfig, new: ShardConfig) -> dict[tuple[str, str], int]:
    """Width of the hash space per (old owner, new owner) pair, staying pairs included.

    Every position of either continuum is a boundary; between two consecutive boundaries both
    owners are constant, so summing those interval widths is exact. Widths add up to 2**32.
    """
    before, after = Continuum.of(old), Continuum.of(new)
    bounds = sorted({0, *before.positions, *after.positions})
    widths: dict[tuple[str, str], int] = {}
    for start, end in zip(bounds, [*bounds[1:], HASH_SPACE], strict=True):
        pair = (before.owner_at(start), after.owner_at(start))
        widths[pair] = widths.get(pair, 0) + end - start
    return widths


def moved_fraction(widths: dict[tuple[str, str], int]) -> float:
    return sum(w for (src, dst), w in widths.items() if src != dst) / HASH_SPACE


def _table(rows: Iterable[tuple[str, str, str]]) -> list[str]:
    rows = list(rows)
    sizes = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{a:<{sizes[0]}}  {b:<{sizes[1]}}  {c:>{sizes[2]}}".rstrip() for a, b, c in rows]


def plan(old_path: str, new_path: str, out: TextIO, err: TextIO) -> int:
    """Print the fraction of the key space each (from -> to) group pair moves, and the total."""
    old, new = _load_or_report(old_path, err), _load_or_report(new_path, err)
    if old is None or new is None:
        return 1
    for label, path, config in (("old", old_path, old), ("new", new_path, new)):
        print(f"{label} epoch {config_epoch(config)}  {path} ({len(config.groups)} groups)", file=out)
    widths = movement(old, new)
    moves = sorted(((p, w) for p, w in widths.items() if p[0] != p[1]), key=lambda item: (-item[1], item[0]))
    if not moves:
        print("no key moves", file=out)
        return 0
    rows = [("from", "to", "fraction")]
    rows += [(src, dst, f"{w / HASH_SPACE:.6f}") for (src, dst), w in moves]
    for line in _table(rows):
        print(line, file=out)
    total = moved_fraction(widths)
    print(f"moved {total:.6f} of the key space ({total:.2%})", file=out)
    return 0
