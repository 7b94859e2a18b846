"""The coordinator: the I/O around the hand-off's pure decisions (``gateway.handoff``).

One per gateway replica. While its replica leads, it reads the shard state, writes the first
one if there is none, and otherwise asks ``next_state`` what to write next: a direct commit, a
fence phase, the end of one. While fencing it keeps one ``Barrier`` per fencing state,
observed from the moment this replica first saw that state (its own write acknowledged, or a
read), and polls the barrier's participants: the fenced pods of every group that loses keys
(concurrently, through ``PodProber``) and the registered gateway replicas (``ReplicaRegistry``).
Every write is a compare-and-swap; a lost race is re-read next round, never overwritten.

The design and its safety argument: docs/design/014-ownership-handoff.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config import parse_shard_config
from gateway.coordination.election import Election
from gateway.coordination.prober import UNFENCED, PodProber
from gateway.coordination.registry import ReplicaRegistry
from gateway.coordination.store import Conflict, StateStore
from gateway.handoff import (
    Barrier,
    Desired,
    Report,
    initial_state,
    losing_groups,
    next_state,
    participants_of,
)
from gateway.ring import config_epoch
from gateway.shardstate import Phase, ShardState, View, moved_share
from gateway.tasks import cancel_and_wait, sleep_or_wake

__all__ = ["Coordinator"]

log = logging.getLogger("shardgate.coordinator")

NO_DESIRED = Desired("", None)  # the desired config is not known yet (or is gone)


@dataclass(frozen=True)
class _Facts:
    """What the coordinator derives once per state (off the event loop: ring builds)."""

    generation: int
    epoch: str
    next_epoch: str | None = None
    moving_share: float | None = None
    view: View | None = None  # while fencing
    losing: frozenset[str] = frozenset()
    lease: float = 0.0
    # The ``endpoints:`` of losing groups, from the config in force: its pods whatever the
    # discovery (which follows the desired config, where the group may be gone) still knows.
    listed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _facts_of(state: ShardState) -> _Facts:
    if state.phase is not Phase.FENCING:
        return _Facts(state.generation, config_epoch(parse_shard_config(state.config)))
    view = View.of(state)
    assert view.incoming is not None
    old, new = view.current.config, view.incoming.config
    losing = losing_groups(old, new)
    listed = {g.name: g.endpoints for g in old.groups if g.name in losing and g.endpoints}
    return _Facts(
        state.generation,
        view.epoch,
        view.next_epoch,
        moved_share(old, new),
        view,
        losing,
        view.barrier_lease,
        listed,
    )


class Coordinator:
    """Drives hand-offs while ``election`` says this replica leads."""

    def __init__(
        self,
        *,
        identity: str,
        store: StateStore,
        election: Election,
        registry: ReplicaRegistry | None,
        prober: PodProber,
        desired: Callable[[], str | None],
        pods_of: Callable[[str], Iterable[str]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        interval: float = 0.25,
        stable_interval: float = 1.0,
        backoff_max: float = 5.0,
        on_handoff: Callable[[str, float], None] | None = None,
    ) -> None:
        """``on_handoff(outcome, seconds)``: a hand-off this replica ended ("committed" or
        "rolled_back", and how long its fence phase lasted), for the metrics."""
        self.identity = identity
        self._on_handoff = on_handoff
        self.store = store
        self.election = election
        self.registry = registry  # the gateway reports what it holds here (``report``)
        self.prober = prober
        self._desired = desired
        self._pods_of = pods_of
        self._clock = clock
        self._wall = wall
        self.interval = interval
        self.stable_interval = stable_interval
        self.backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._desired_cache: Desired = NO_DESIRED
        # What this replica knows of the state, and the barrier of the fencing generation.
        self._state: ShardState | None = None
        self._facts: _Facts | None = None
        self._barrier: Barrier | None = None
        self._barrier_of: ShardState | None = None  # the fencing state the barrier belongs to
        self._participants: frozenset[str] = frozenset()
        self._waiting_for: list[str] = []
        self._held_by: str | None = None  # "reports" | "silent deadline", once the barrier held
        self._unfenced: set[str] = set()
        self._announced = False  # the fence phase's start was logged (with its participants)
        self._retry: tuple[str, float] | None = None  # (desired text, not before) after a rollback
        self._last_rollback: dict[str, object] | None = None
        self.rounds = 0
        self.conflicts = 0
        self.failures = 0  # consecutive failed rounds
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self.prober.start()
        if self.registry is not None:
            await self.registry.start()
        await self.election.start(self.desired_changed)
        self._task = asyncio.create_task(self._run(), name=f"coordinator-{self.identity}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        await self.election.stop()
        if self.registry is not None:
            await self.registry.stop()
        await self.prober.stop()

    def desired_changed(self) -> None:
        """Run a round now (the desired config changed, or leadership did). Thread-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            delay: float | None = None
            if self.election.leading:
                try:
                    delay = await self._round()
                    if self.failures:
                        log.info("coordinator %s: rounds succeed again", self.identity)
                    self.failures, self.last_error = 0, None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures += 1
                    message = f"{type(exc).__name__}: {exc}"
                    if message != self.last_error:
                        log.warning("coordinator %s: round failed: %s", self.identity, message, exc_info=exc)
                    self.last_error = message
                    ceiling = min(self.backoff_max, self.interval * 2**self.failures)
                    delay = random.uniform(ceiling / 2, ceiling)
            if delay is None or delay > 0:
                await sleep_or_wake(self._wake, delay)
            self._wake.clear()

    def _desired_now(self) -> Desired:
        text = self._desired()
        if text is None:
            return NO_DESIRED
        if text != self._desired_cache.text:
            self._desired_cache = Desired.of(text)
        return self._desired_cache

    async def _round(self) -> float:
        """One round; how long until the next (0: at once)."""
        self.rounds += 1
        state, version = await self.store.read()
        read_at = self._clock()
        desired = self._desired_now()
        if state is None:
            return await self._create_first(desired, version)
        assert version is not None
        await self._observe(state, read_at)
        holds = False
        if state.phase is Phase.FENCING:
            holds = await self._poll_barrier(state)
        retry = self._retry
        retry_not_before = retry[1] if retry is not None and retry[0] == desired.text else None
        following = await asyncio.to_thread(
            next_state,
            state,
            desired,
            self._wall(),
            self.identity,
            barrier_holds=holds,
            retry_not_before=retry_not_before,
        )
        if following is None:
            return self.interval if state.phase is Phase.FENCING else self.stable_interval
        if not self.election.leading:
            return self.stable_interval
        try:
            await self.store.write(following, version)
        except Conflict as exc:
            self.conflicts += 1
            log.info(
                "coordinator %s: generation %d was replaced meanwhile (%s); reading it again",
                self.identity,
                state.generation,
                exc,
            )
            return self.interval
        if state.phase is Phase.FENCING and following.config == state.config and desired.text == state.next:
            # Rolled back at the deadline while the operator still wants it: a retry now would
            # most likely stall the same way, so wait one barrier timeout (another text: at once).
            timeout = desired.config.handoff.barrier_timeout_seconds if desired.config is not None else 0.0
            self._retry = (desired.text, self._wall() + timeout)
        await self._observe(following, self._clock(), previous=state)
        return 0.0 if following.phase is Phase.FENCING else self.stable_interval

    async def _create_first(self, desired: Desired, version: str | None) -> float:
        first = initial_state(desired, self._wall(), self.identity)
        if first is None:
            self.last_error = "no valid desired config yet: no shard state to create"
            return self.stable_interval
        if not self.election.leading:
            return self.stable_interval
        try:
            if version is None:
                await self.store.create(first)
            else:  # the holder exists without a state in it
                await self.store.write(first, version)
        except Conflict:
            self.conflicts += 1
            return 0.0
        log.info(
            "coordinator %s: created the shard state (generation 1) from the desired config", self.identity
        )
        await self._observe(first, self._clock(), previous=first)
        return self.stable_interval

    # -- what this replica knows ----------------------------------------------------------------

    async def _observe(self, state: ShardState, at: float, *, previous: ShardState | None = None) -> None:
        """Take ``state`` as the latest known, seen at ``at`` (our monotonic clock): after our
        own write of it was acknowledged (``previous``: the state it replaced), or read."""
        known = self._state
        if state == known:
            return
        if known is not None and state.generation <= known.generation:
            log.warning(
                "coordinator %s: the shard state went from generation %d back to %d (edited by hand?):"
                " continuing from it",
                self.identity,
                known.generation,
                state.generation,
            )
        facts = await asyncio.to_thread(_facts_of, state)
        self._state, self._facts = state, facts
        if state.phase is Phase.FENCING:
            if self._barrier is None or self._barrier_of != state:
                # One barrier per fencing state (not per generation number: a hand edit could
                # reuse one), observed from now.
                self._barrier = Barrier(state.generation, observed_at=at, lease=facts.lease)
                self._barrier_of = state
                self._waiting_for, self._held_by, self._participants = [], None, frozenset()
                self._unfenced = set()
                self._announced = False
            return  # announced with its participants by the first poll of its barrier
        if previous is None:
            log.info(
                "coordinator %s: read shard state generation %d (%s, epoch %s, written by %s: %s)",
                self.identity,
                state.generation,
                state.phase,
                facts.epoch,
                state.leader,
                state.outcome,
            )
            return
        outcome = state.outcome or ""
        if previous.phase is Phase.FENCING and self._on_handoff is not None and state.leader == self.identity:
            ended = "rolled_back" if state.config == previous.config else "committed"
            self._on_handoff(ended, max(0.0, state.since - previous.since))
        if previous.phase is Phase.FENCING and state.config == previous.config:
            waited = list(self._waiting_for)
            self._last_rollback = {"generation": state.generation, "reason": outcome, "waiting_for": waited}
            retry = self._retry
            log.warning(
                "hand-off rolled back: generation %d, epoch %s stays (%s); the barrier still waited for %s%s",
                state.generation,
                facts.epoch,
                outcome.removeprefix("rolled back: "),
                ", ".join(waited) or "nobody",
                f"; the same config is tried again in {retry[1] - self._wall():.0f}s"
                if retry is not None and retry[0] == previous.next and retry[1] > self._wall()
                else "",
            )
        elif previous.phase is Phase.FENCING:
            log.info(
                "hand-off committed: generation %d, epoch %s, %.1fs after the fence phase began"
                " (barrier held by %s)",
                state.generation,
                facts.epoch,
                state.since - previous.since,
                self._held_by or "reports",
            )
        elif previous is not state:
            log.info(
                "shard state generation %d committed directly: epoch %s (%s)",
                state.generation,
                facts.epoch,
                outcome,
            )

    # -- the barrier ----------------------------------------------------------------------------

    async def _poll_barrier(self, state: ShardState) -> bool:
        """Poll every participant not yet done; whether the barrier holds now."""
        barrier, facts = self._barrier, self._facts
        assert barrier is not None and facts is not None and facts.view is not None
        pods = {
            group: list(dict.fromkeys([*facts.listed.get(group, ()), *self._pods_of(group)]))
            for group in sorted(facts.losing)
        }
        unknown = [group for group, addresses in pods.items() if not addresses]
        if unknown and not self._announced:
            log.warning(
                "fence phase generation %d: no pod known for losing group(s) %s: the barrier cannot ask"
                " them (is the discovery still watching their Services?)",
                state.generation,
                ", ".join(unknown),
            )
        addresses = sorted({a for group in pods.values() for a in group if f"pod:{a}" not in barrier.done})
        probes = asyncio.gather(*(self.prober.probe(a, state.generation) for a in addresses))
        try:
            replicas: dict[str, Report] = await self.registry.replicas() if self.registry is not None else {}
        finally:
            answers = await probes
        # A losing group whose pods nobody knows (its Service not listed yet) may still have pods
        # that accept its keys: it stands in the barrier as a participant that never answers, so
        # the commit waits for the silent deadline.
        participants = participants_of(facts.view, pods, replicas) | {f"group:{g}" for g in unknown}
        if not self._announced:
            self._announced = True
            log.info(
                "fence phase started: generation %d, epoch %s -> %s, %.2f%% of keys moving, written by %s,"
                " deadline in %.0fs; %d participants: %s",
                state.generation,
                facts.epoch,
                facts.next_epoch,
                (facts.moving_share or 0.0) * 100,
                state.leader,
                (state.deadline or state.since) - state.since,
                len(participants),
                ", ".join(sorted(participants)) or "none",
            )
        elif participants != self._participants:
            log.info(
                "fence phase generation %d: participants now %s",
                state.generation,
                ", ".join(sorted(participants)) or "none",
            )
        self._participants = participants
        for address, answer in zip(addresses, answers, strict=True):
            if answer is UNFENCED:
                self._unfenced.add(address)
                barrier.done.add(f"pod:{address}")
            elif isinstance(answer, Report):
                barrier.record(f"pod:{address}", answer)
        for name, report in replicas.items():
            barrier.record(f"replica:{name}", report)
        self._waiting_for = barrier.waiting_for(participants, self._clock())
        if self._waiting_for:
            return False
        if self._held_by is None:
            silent = sorted(p for p in participants if p not in barrier.done)
            self._held_by = "reports" if not silent else "silent deadline"
            if silent:
                log.info(
                    "fence phase generation %d: %s silent until 2 x lease + margin: counted stopped",
                    state.generation,
                    ", ".join(silent),
                )
        return True

    # -- for /debug/ring ------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        state, facts = self._state, self._facts
        retry = self._retry
        return {
            "identity": self.identity,
            "leader": self.election.leading,
            "election": self.election.describe(),
            "store": self.store.name,
            "registry": self.registry.describe() if self.registry is not None else None,
            "generation": state.generation if state is not None else None,
            "phase": str(state.phase) if state is not None else None,
            "epoch": facts.epoch if facts is not None else None,
            "next_epoch": facts.next_epoch if facts is not None else None,
            "moving_share": facts.moving_share if facts is not None else None,
            "since": state.since if state is not None else None,
            "deadline": state.deadline if state is not None else None,
            "written_by": state.leader if state is not None else None,
            "participants": sorted(self._participants) if state is not None and state.next else [],
            "waiting_for": list(self._waiting_for) if state is not None and state.next else [],
            "barrier_held_by": self._held_by,  # of the last fence phase: "reports" | "silent deadline"
            "unfenced": sorted(self._unfenced),
            "last_outcome": state.outcome if state is not None else None,
            "last_rollback": self._last_rollback,
            "retry_not_before": retry[1] if retry is not None else None,
            "rounds": self.rounds,
            "conflicts": self.conflicts,
            "last_error": self.last_error,
        }
