"""The hand-off's decisions: which state the leader writes next, and when the barrier holds.

Pure and clock-free (every time is passed in), so that the protocol can be driven through any
interleaving by a test. The design and its safety argument are in
docs/design/014-ownership-handoff.md; the I/O around these decisions (leader election, state
writes, polling the participants) is in the coordinator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config import ConfigError, ShardConfig, lease_margin, parse_shard_config
from gateway.offline import movement
from gateway.ring import config_epoch
from gateway.shardstate import Phase, ShardState, View, routing_changes_keys


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def moves_keys(old: ShardConfig, new: ShardConfig) -> bool:
    """Whether some key has another owner under ``new`` (or writes are read differently)."""
    if routing_changes_keys(old, new):
        return True
    return any(src != dst and width > 0 for (src, dst), width in movement(old, new).items())


def losing_groups(old: ShardConfig, new: ShardConfig) -> frozenset[str]:
    """The groups that own keys under ``old`` that they do not own under ``new``: the only
    ones whose pods can accept a moving key before the commit (the barrier waits for them)."""
    if routing_changes_keys(old, new):
        return frozenset(g.name for g in old.groups)
    return frozenset(src for (src, dst), width in movement(old, new).items() if src != dst and width > 0)


def view_lease(view: View) -> float:
    """The lease a barrier on ``view`` assumes for a silent party (``View.barrier_lease``)."""
    return view.barrier_lease


def _leases(state: ShardState) -> list[float]:
    texts = [state.config] + ([state.next] if state.next is not None else [])
    return [parse_shard_config(text).handoff.fence_lease_seconds for text in texts]


def lease_floor_after(state: ShardState) -> float:
    """The ``lease_floor`` of a state written after ``state``: no lease it or any state before
    it used may be forgotten (a party may hold any of their views)."""
    return max([state.lease_floor, *_leases(state)])


# ---------------------------------------------------------------------------------------------
# The barrier


@dataclass(frozen=True, slots=True)
class Report:
    """What a participant last said: the generation it holds and its writes in flight for keys
    moving under that generation's state."""

    generation: int | None
    moving_in_flight: int


@dataclass
class Barrier:
    """One fencing state's barrier, on the leader's monotonic clock.

    ``observed_at`` is when this leader first saw the fencing state (its write acknowledged, or
    read): every read that showed any party an older state was sent before then.
    """

    generation: int
    observed_at: float
    lease: float
    done: set[str] = field(default_factory=set)

    @property
    def silent_deadline(self) -> float:
        """From this moment on, a participant that never reported has surely stopped: any view
        older than the fencing state it held ran out of lease by ``observed_at + lease``, and a
        write it accepted just before finished within one more lease (the fence's assumption)."""
        return self.observed_at + 2 * self.lease + lease_margin(self.lease)

    def record(self, participant: str, report: Report) -> None:
        """A report counts once it shows the fencing state applied with nothing moving in
        flight; it stays counted (a party never goes back to an older generation)."""
        if (
            report.generation is not None
            and report.generation >= self.generation
            and report.moving_in_flight == 0
        ):
            self.done.add(participant)

    def waiting_for(self, participants: Iterable[str], now: float) -> list[str]:
        if now >= self.silent_deadline:
            return []
        return sorted(p for p in participants if p not in self.done)


# ---------------------------------------------------------------------------------------------
# The next state


@dataclass(frozen=True, slots=True)
class Desired:
    """The desired config as the operator left it: its text, and the config if it is valid."""

    text: str
    config: ShardConfig | None

    @classmethod
    def of(cls, text: str) -> Desired:
        try:
            return cls(text, parse_shard_config(text))
        except ConfigError:
            return cls(text, None)


def _same_config(text: str, config: ShardConfig) -> bool:
    try:
        return config_epoch(parse_shard_config(text)) == config_epoch(config)
    except ConfigError:
        return False


def initial_state(desired: Desired, now: float, leader: str) -> ShardState | None:
    """The first state of a fleet: the desired config in force (nothing to hand off from)."""
    if desired.config is None:
        return None
    return ShardState(
        generation=1, phase=Phase.STABLE, config=desired.text, since=now, leader=leader, outcome="initial"
    )


def next_state(
    state: ShardState,
    desired: Desired,
    now: float,
    leader: str,
    *,
    barrier_holds: bool,
    retry_not_before: float | None = None,
) -> ShardState | None:
    """The state the leader writes after ``state``, or None to write nothing yet.

    ``now`` is wall-clock time (only stored, and compared with ``state.deadline``, which this
    function wrote: liveness, never safety). ``retry_not_before``: after a rollback the same
    desired config is not tried again before this time.
    """
    if state.phase is Phase.FENCING:
        return _end_of_fencing(state, desired, now, leader, barrier_holds=barrier_holds)
    config = desired.config
    if config is None or _same_config(state.config, config):
        return None
    current = parse_shard_config(state.config)
    if (
        config.handoff.mode == "immediate"
        or current.handoff.mode == "immediate"
        or not moves_keys(current, config)
    ):
        return _stable(state, desired.text, now, leader, "committed (no key moves)")
    if retry_not_before is not None and now < retry_not_before:
        return None
    floor = lease_floor_after(state)
    # The barrier may have to wait out a silent party under the longest lease in play: the
    # deadline leaves it the time to (2 leases and the margin), whatever the timeout says.
    longest = max(floor, config.handoff.fence_lease_seconds)
    timeout = max(config.handoff.barrier_timeout_seconds, 2 * longest + lease_margin(longest) + 10)
    return ShardState(
        generation=state.generation + 1,
        phase=Phase.FENCING,
        config=state.config,
        next=desired.text,
        since=now,
        deadline=now + timeout,
        leader=leader,
        outcome=state.outcome,
        lease_floor=floor,
    )


def _end_of_fencing(
    state: ShardState, desired: Desired, now: float, leader: str, *, barrier_holds: bool
) -> ShardState | None:
    assert state.next is not None
    if barrier_holds:
        return _stable(state, state.next, now, leader, f"committed after {now - state.since:.1f}s")
    if desired.config is not None and _same_config(state.config, desired.config):
        return _stable(
            state, state.config, now, leader, "rolled back: the desired config returned to the one in force"
        )
    if state.deadline is not None and now >= state.deadline:
        return _stable(state, state.config, now, leader, "rolled back: barrier not reached in time")
    return None


def _stable(state: ShardState, text: str, now: float, leader: str, outcome: str) -> ShardState:
    return ShardState(
        generation=state.generation + 1,
        phase=Phase.STABLE,
        config=text,
        since=now,
        leader=leader,
        outcome=outcome,
        lease_floor=lease_floor_after(state),
    )


def participants_of(
    view: View, pods_by_group: Mapping[str, Iterable[str]], replicas: Iterable[str]
) -> frozenset[str]:
    """Who the barrier of a fencing ``view`` waits for: every registered gateway replica and every
    pod (by address) of every group that loses keys."""
    assert view.incoming is not None
    losing = losing_groups(view.current.config, view.incoming.config)
    pods = {f"pod:{address}" for group in losing for address in pods_by_group.get(group, ())}
    return frozenset(pods | {f"replica:{name}" for name in replicas})
