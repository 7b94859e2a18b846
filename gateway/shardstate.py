"""The shard state: which shard config is in force, in which phase, at which generation.

Operators edit the desired config (``shards.yaml``); the state is what the fleet has agreed to
act on, written only by the replica that drives hand-offs (docs/design/014-ownership-handoff.md).
It lives beside the desired config: a ConfigMap ``NAME-state`` (key ``state.json``) next to the ConfigMap
``NAME``, or a file ``PATH.state`` next to the file ``PATH``. Gateways route on it and the
backends' fences (``gateway.fence``) check writes against it.

A state has an ordered **generation**: every state written has a higher one than the state it
replaced, so any two views can say which is newer (an epoch, a digest, cannot). Its **phase**
is ``stable`` (one config in force) or ``fencing`` (a hand-off from ``config`` to ``next``:
keys whose owner differs between the two belong to nobody until the hand-off ends).

``View`` is a party's parsed copy of one state, built off the request path: the topology of
each config and the rule that says, for a write's key, which group may accept it now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.config import ConfigError, ShardConfig, parse_shard_config
from gateway.offline import moved_fraction, movement
from gateway.router import Refusal, moving_to, owner_group
from gateway.topology import Handoff, Topology, TopologyBuilder

STATE_KEY = "state.json"  # the key of the state ConfigMap that holds the state document


def state_configmap_name(configmap: str) -> str:
    """The state ConfigMap that belongs to the desired-config ConfigMap ``configmap``."""
    return f"{configmap}-state"


def state_file_path(config_path: str) -> str:
    """The state file that belongs to the desired-config file ``config_path``."""
    return f"{config_path}.state"


class StateError(Exception):
    """A state document that cannot be used (a bug or a hand edit: never acted on)."""


class Phase(StrEnum):
    STABLE = "stable"
    FENCING = "fencing"


class ShardState(BaseModel):
    """One state document, as stored (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    generation: Annotated[int, Field(ge=1, strict=True)]
    phase: Phase
    config: str  # the shards.yaml text in force; while fencing, the one handed off from
    next: str | None = None  # while fencing: the shards.yaml text being handed to
    since: float  # when this phase began (the leader's clock, unix seconds; for people)
    deadline: float | None = None  # while fencing: when the barrier gives up (leader's clock)
    leader: str | None = None  # the replica that wrote this state
    outcome: str | None = None  # how the state before it ended: "committed", "rolled back: ..."
    # The longest fence lease of any state before this one: a party may still act on a view of
    # such a state that long after its last confirmation, so a barrier waits for it (a lease
    # lowered by a direct commit would otherwise let it run out "early").
    lease_floor: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _phase_fields(self) -> ShardState:
        if (self.phase is Phase.FENCING) != (self.next is not None):
            raise ValueError("a fencing state names the next config; a stable one does not")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardState:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}" for e in exc.errors()
            )
            raise StateError(f"invalid shard state: {problems}") from None


@dataclass(frozen=True, slots=True)
class Moving:
    """A key that changes owner in the hand-off under way: nobody may write it now."""

    source: str  # its owner before the hand-off
    target: str  # its owner after it


def routing_changes_keys(old: ShardConfig, new: ShardConfig) -> bool:
    """Whether the two configs read or classify writes differently: then every key counts as
    moving, since the same request may be a write for another key (or no write) under ``new``."""
    before, after = old.routing, new.routing
    return (before.key_header.lower(), before.operation_header, before.write_methods) != (
        after.key_header.lower(),
        after.operation_header,
        after.write_methods,
    )


def moved_share(old: ShardConfig, new: ShardConfig) -> float:
    """The share of the key space whose owner differs between ``old`` and ``new`` (exact)."""
    if routing_changes_keys(old, new):
        return 1.0
    return moved_fraction(movement(old, new))


@dataclass(frozen=True, slots=True)
class View:
    """One party's parsed copy of a state: what it routes or fences on."""

    state: ShardState
    current: Topology  # the config in force (while fencing: the one handed off from)
    handoff: Handoff | None  # while fencing: the config handed to, and what moves

    @property
    def incoming(self) -> Topology | None:
        """While fencing: the topology of the config handed to."""
        return self.handoff.incoming if self.handoff is not None else None

    @property
    def every_key_moves(self) -> bool:
        return self.handoff is not None and self.handoff.every_key_moves

    @classmethod
    def of(cls, state: ShardState) -> View:
        """Parse both configs of ``state``; StateError if either is invalid (it never should
        be: the leader writes only configs it validated)."""
        try:
            current = parse_shard_config(state.config)
            incoming = parse_shard_config(state.next) if state.next is not None else None
        except ConfigError as exc:
            raise StateError(f"shard state generation {state.generation}: {exc}") from None
        # Separate builders: the two topologies must not share Pod objects or a ring.
        current_topology = TopologyBuilder().build(current)
        incoming_topology = TopologyBuilder().build(incoming) if incoming is not None else None
        handoff = None
        if incoming is not None and incoming_topology is not None:
            handoff = Handoff(state.generation, incoming_topology, routing_changes_keys(current, incoming))
        return cls(state, current_topology, handoff)

    @property
    def generation(self) -> int:
        return self.state.generation

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def epoch(self) -> str:
        """The epoch of the config in force (while fencing: the one handed off from)."""
        return self.current.epoch

    @property
    def next_epoch(self) -> str | None:
        return self.incoming.epoch if self.incoming is not None else None

    @property
    def lease(self) -> float:
        """How long a party may act on this view after it last confirmed it: while fencing,
        the longer of the two configs' leases (either config may be the one in force)."""
        leases = [self.current.config.handoff.fence_lease_seconds]
        if self.incoming is not None:
            leases.append(self.incoming.config.handoff.fence_lease_seconds)
        return max(leases)

    @property
    def barrier_lease(self) -> float:
        """The lease a barrier on this view must assume for a silent party: its own, or a longer
        one some party may still hold a view under."""
        return max(self.lease, self.state.lease_floor)

    @property
    def routing_topology(self) -> Topology:
        """The topology whose routing rules (key header, write methods) apply in this view."""
        return self.current

    def write_owner(self, raw_key: bytes) -> str | Moving | Refusal:
        """Who may accept a write for the key header value ``raw_key`` in this view: its owner
        group, ``Moving`` when the hand-off under way moves it, or why the key is refused.

        The key is read and validated by the gateway's own router (``owner_group``): the same
        rule on both sides of the wire, not a copy of it.
        """
        found = owner_group(self.current, raw_key)
        if isinstance(found, Refusal):
            return found
        target = moving_to(self.handoff, raw_key, found.name) if self.handoff is not None else None
        return Moving(found.name, target) if target is not None else found.name

    def describe(self) -> dict[str, object]:
        state = self.state
        return {
            "generation": state.generation,
            "phase": str(state.phase),
            "epoch": self.epoch,
            "next_epoch": self.next_epoch,
            "since": state.since,
            "deadline": state.deadline,
            "leader": state.leader,
            "outcome": state.outcome,
        }
