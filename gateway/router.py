"""Request -> routing decision: read/write classification, shard key, owner group, pod choice.

Pure functions over an immutable ``Topology`` snapshot; no I/O, no logging on the hot path.
Strict ownership lives here: a write's candidate set is only ever its owner group's ready pods.
"""

from __future__ import annotations

import random
import re

from gateway.topology import Decision, GroupView, Handoff, Pod, PodState, Topology

__all__ = [
    "MISSING_KEY",
    "REPEATED_KEY",
    "STATE_UNCONFIRMED",
    "Decision",
    "Refusal",
    "choose_pod",
    "decide",
    "is_write",
    "moving_to",
    "owner_group",
    "shard_moving",
]

MAX_KEY_BYTES = 256
_READY = PodState.READY
_random = random.random
_DEL = b"\x7f"
_WHITESPACE = b" \t"
_WRITE = b"write"
# C1 control characters (U+0080..U+009F) as UTF-8: in valid UTF-8, 0xC2 only starts a character.
_C1_CONTROL = re.compile(rb"\xc2[\x80-\x9f]")


class Refusal:
    """A request the gateway answers itself, with the contract's JSON error."""

    __slots__ = ("code", "detail", "group", "headers", "retry_after", "status")

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        retry_after: int | None = None,
        group: str | None = None,
        headers: tuple[bytes, ...] = (),
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        self.group = group  # the owner group, when one is known (sent as X-Shard-Group)
        self.headers = headers  # more field lines of the answer (a 429's RateLimit fields)

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r})"


MISSING_KEY = Refusal(400, "missing_shard_key", "a write needs the shard key header")
REPEATED_KEY = Refusal(400, "invalid_shard_key", "the shard key header must appear once")
NOT_READY = Refusal(503, "not_ready", "no shard config is loaded yet")
NO_READY_POD = Refusal(503, "shard_unavailable", "no shard group has a ready pod", retry_after=1)
STATE_UNCONFIRMED = Refusal(
    503,
    "shard_state_unconfirmed",
    "the gateway could not confirm its view of the shard state within its lease; writes wait for it",
    retry_after=1,
)


def shard_moving(source: str, target: str) -> Refusal:
    return Refusal(
        503,
        "shard_moving",
        f"a hand-off is moving this key from {source} to {target}: retry once it ends",
        retry_after=1,
    )


def invalid_key(reason: str) -> Refusal:
    return Refusal(400, "invalid_shard_key", reason)


def shard_unavailable(group: str) -> Refusal:
    return Refusal(
        503, "shard_unavailable", f"shard group {group} has no ready pod; writes are not rerouted", 1, group
    )


def is_write(topology: Topology, method: bytes, operation: bytes | None) -> bool:
    """Methods decide; the operation header can only turn a read into a write, never back."""
    if method in topology.write_methods:
        return True
    return operation is not None and operation.strip(_WHITESPACE).lower() == _WRITE


def owner_group(topology: Topology, raw_key: bytes) -> GroupView | Refusal:
    """Owner of a raw key header value; validates the key on a cache miss only."""
    name = topology.ring.cached_owner(raw_key)
    return topology.groups[name] if name is not None else _resolve_new_key(topology, raw_key)


def _resolve_new_key(topology: Topology, raw_key: bytes) -> GroupView | Refusal:
    """Validate a key not seen before, find its owner on the ring, and remember it."""
    key = raw_key.strip(_WHITESPACE)
    if not key:
        return MISSING_KEY
    if len(key) > MAX_KEY_BYTES:
        return invalid_key(f"shard key is longer than {MAX_KEY_BYTES} bytes")
    if key.isascii():
        # ASCII is printable exactly when it has no control character (0x00-0x1f, 0x7f).
        if not key.decode("ascii").isprintable():
            return invalid_key("shard key contains control characters")
    else:
        if min(key) < 0x20 or _DEL in key:
            return invalid_key("shard key contains control characters")
        try:
            key.decode("utf-8")  # only to validate: the ring hashes these very bytes
        except UnicodeDecodeError:
            return invalid_key("shard key is not valid UTF-8")
        if _C1_CONTROL.search(key) is not None:
            return invalid_key("shard key contains control characters")
    return topology.groups[topology.ring.resolve(raw_key, key)]


def decide(
    topology: Topology | None, method: bytes, raw_key: bytes | None, operation: bytes | None
) -> Decision | Refusal:
    """Where a request may go: its allowed set of pods, or why it may go nowhere."""
    if topology is None:
        return NOT_READY
    write = is_write(topology, method, operation)
    handoff = topology.handoff
    if (
        not write
        and handoff is not None
        and handoff.every_key_moves
        and is_write(handoff.incoming, method, operation)
    ):
        # The config handed to makes this a write: while the hand-off lasts nobody may take it.
        return shard_moving("the config in force", "the config handed to")
    owner: GroupView | None = None
    if raw_key is not None:
        found = owner_group(topology, raw_key)
        if isinstance(found, Refusal):
            if write or found is not MISSING_KEY:
                return found  # (a read without a usable key is a read without a key)
        else:
            owner = found
    if write:
        if owner is None:
            return MISSING_KEY
        if topology.unconfirmed:
            return STATE_UNCONFIRMED  # its view may be stale: the owner it names may not be one
        if topology.handoff is not None and raw_key is not None:  # (a write with an owner has a key)
            target = moving_to(topology.handoff, raw_key, owner.name)
            if target is not None:
                return shard_moving(owner.name, target)
        if not owner.ready:
            return shard_unavailable(owner.name)
        return owner.write_decision
    reads = topology.reads
    if owner is not None and reads != "any":
        if owner.ready:
            return owner.read_decision
        if reads == "owner":
            return shard_unavailable(owner.name)
    if not topology.ready:
        return NO_READY_POD
    return topology.any_read


def moving_to(handoff: Handoff, raw_key: bytes, owner: str) -> str | None:
    """The group a hand-off moves an (already validated) key to, or None if it stays."""
    found = owner_group(handoff.incoming, raw_key)
    target = found.name if isinstance(found, GroupView) else owner
    return target if handoff.every_key_moves or target != owner else None


def choose_pod(candidates: tuple[Pod, ...], exclude: Pod | None = None) -> Pod | None:
    """Power of two choices on in-flight requests: near least-loaded at O(1) cost."""
    count = len(candidates)
    if count == 1:
        pod = candidates[0]
        return None if pod is exclude or pod.state is not _READY or pod.ejected else pod
    if exclude is not None or count == 0:
        candidates = tuple(p for p in candidates if p is not exclude and p.eligible)
        count = len(candidates)
        if count == 0:
            return None
        if count == 1:
            return candidates[0]
    if count == 2:
        first, second = candidates
    else:
        # Two distinct indexes from one random number: i, and j among the other count - 1.
        i, j = divmod(int(_random() * count * (count - 1)), count - 1)
        if j >= i:
            j += 1
        first, second = candidates[i], candidates[j]
    # A pod may have left the eligible set after this snapshot was taken (drain, ejection).
    first_ok = first.state is _READY and not first.ejected
    second_ok = second.state is _READY and not second.ejected
    if not (first_ok and second_ok):
        if first_ok or second_ok:
            return first if first_ok else second
        eligible = tuple(p for p in candidates if p.eligible)
        return choose_pod(eligible) if eligible else None
    if first.inflight < second.inflight:
        return first
    if second.inflight < first.inflight:
        return second
    # A tie: ``first`` is already a uniform pick when there were more than two candidates.
    return first if count > 2 or _random() < 0.5 else second
