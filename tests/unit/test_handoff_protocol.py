"""The hand-off protocol as a hypothesis state machine: no interleaving lets two groups accept
writes for one key at overlapping times (docs/design/014-ownership-handoff.md).

The parties run the real decisions: the leaders ``gateway.handoff.next_state`` and ``Barrier``,
the pods ``View.write_owner`` and the lease rule the fence applies. Hypothesis chooses the
interleaving: the operator's edits, which leader acts (two may believe they lead; the store's
compare-and-swap orders them), late and out-of-order watch deliveries, confirmation reads,
pods cut off from the store or paused, writes arriving at any pod (a gateway may be arbitrarily
stale, so any pod may get any write), writes finishing, and time passing.

A negative control runs the same machine with ``handoff.mode: immediate`` and must find an
overlap: the checker is known to catch one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import Phase as Stage
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.handoff import Barrier, Desired, Report, initial_state, next_state, participants_of, view_lease
from gateway.shardstate import Moving, Phase, ShardState, View

LEASE = 5.0
GROUPS = ("g1", "g2", "g3", "g4")
PODS = tuple((group, index) for group in GROUPS for index in (0, 1))
POD_NAMES = tuple(f"{g}-{i}" for g, i in PODS)
KEYS = tuple(f"user-{i}".encode() for i in range(8))


def config_text(groups: dict[str, int], mode: str = "fenced", lease: float = LEASE) -> str:
    lines = [
        "version: 1",
        "ring: {vnodes: 40}",
        f"handoff: {{mode: {mode}, fence_lease_seconds: {lease}, barrier_timeout_seconds: {3 * LEASE}}}",
        "groups:",
    ]
    lines += [
        f"  - {{name: {name}, weight: {weight}, endpoints: ['10.0.0.{i}:80']}}"
        for i, (name, weight) in enumerate(groups.items(), 1)
    ]
    return "\n".join(lines) + "\n"


LAYOUTS = (
    {"g1": 1, "g2": 1},
    {"g1": 1, "g2": 1, "g3": 1},
    {"g1": 1, "g2": 2, "g3": 1},
    {"g2": 1, "g3": 1, "g4": 1},
    {"g1": 1, "g2": 1, "g3": 1, "g4": 1},
)


_VIEWS: dict[str, View] = {}


def view_of(state: ShardState) -> View:
    """Views are built once per distinct state (a ring build is the costly part)."""
    key = state.to_json()
    view = _VIEWS.get(key)
    if view is None:
        view = _VIEWS[key] = View.of(state)
    return view


@dataclass
class Write:
    key: bytes
    group: str
    generation: int
    start: float
    end: float | None = None


@dataclass
class PodModel:
    group: str
    name: str
    state: ShardState | None = None
    view: View | None = None
    confirmed_at: float | None = None
    cut_off: bool = False
    paused: bool = False
    in_flight: list[Write] = field(default_factory=list)

    def learn(self, state: ShardState) -> None:
        """A party only ever moves to a newer generation."""
        if self.state is None or state.generation > self.state.generation:
            self.state = state
            self.view = view_of(state)

    def accepts(self, key: bytes, now: float) -> bool:
        """The fence's rule: a confirmed view (lease not run out) in which this group owns the key
        and the key is not moving."""
        view = self.view
        if view is None or self.confirmed_at is None or now - self.confirmed_at > view.lease:
            return False
        return view.write_owner(key) == self.group

    def moving_in_flight(self) -> int:
        view = self.view
        if view is None:
            return 0
        return sum(1 for w in self.in_flight if isinstance(view.write_owner(w.key), Moving))


@dataclass
class LeaderModel:
    name: str
    known: ShardState | None = None
    barrier: Barrier | None = None


class HandoffProtocol(RuleBasedStateMachine):
    mode = "fenced"

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.history: list[ShardState] = []
        self.desired = Desired.of(config_text(LAYOUTS[0], self.mode))
        self.pods = {f"{g}-{i}": PodModel(g, f"{g}-{i}") for g, i in PODS}
        self.leaders = [LeaderModel("leader-a"), LeaderModel("leader-b")]
        self.writes: list[Write] = []

    @initialize()
    def start(self) -> None:
        first = initial_state(self.desired, self.now, "leader-a")
        assert first is not None
        self.history.append(first)
        self.pods_confirm_by_reading(set(POD_NAMES))

    @property
    def current(self) -> ShardState:
        return self.history[-1]

    # -- the operator ----------------------------------------------------------------------

    @rule(layout=st.sampled_from(LAYOUTS), lease=st.sampled_from([LEASE, LEASE, 2.0]))
    def edit_desired_config(self, layout: dict[str, int], lease: float) -> None:
        """A new layout; sometimes a shorter lease too (lowered by a commit that moves no key)."""
        self.desired = Desired.of(config_text(layout, self.mode, lease))

    # -- the leaders -----------------------------------------------------------------------

    def _observe(self, leader: LeaderModel, state: ShardState) -> None:
        leader.known = state
        if state.phase is Phase.FENCING and (
            leader.barrier is None or leader.barrier.generation != state.generation
        ):
            leader.barrier = Barrier(state.generation, observed_at=self.now, lease=view_lease(view_of(state)))

    @rule(which=st.sampled_from([0, 1]))
    def leader_reads_the_state(self, which: int) -> None:
        self._observe(self.leaders[which], self.current)

    @precondition(lambda self: any(leader.barrier is not None for leader in self.leaders))
    @rule(which=st.sampled_from([0, 1]), pods=st.sets(st.sampled_from(POD_NAMES), min_size=1))
    def leader_polls_pods(self, which: int, pods: set[str]) -> None:
        """One round of the barrier's polling; a paused pod does not answer."""
        leader = self.leaders[which]
        for pod in sorted(pods):
            model = self.pods[pod]
            if leader.barrier is None or model.paused:
                continue
            generation = model.state.generation if model.state is not None else None
            leader.barrier.record(f"pod:{pod}", Report(generation, model.moving_in_flight()))

    @rule(which=st.sampled_from([0, 1]))
    def leader_acts(self, which: int) -> None:
        leader = self.leaders[which]
        known = leader.known
        if known is None:
            return
        holds = False
        if (
            known.phase is Phase.FENCING
            and leader.barrier is not None
            and leader.barrier.generation == known.generation
        ):
            view = view_of(known)
            everyone = participants_of(view, {g: [f"{g}-{i}" for i in (0, 1)] for g in GROUPS}, replicas=())
            holds = not leader.barrier.waiting_for(everyone, self.now)
        following = next_state(known, self.desired, self.now, leader.name, barrier_holds=holds)
        if following is None:
            return
        assert following.generation == known.generation + 1
        if known is not self.current:
            return  # the compare-and-swap fails: another leader wrote first
        self.history.append(following)
        self._observe(leader, following)
        event(
            f"leader wrote a {following.phase} state: {following.outcome or 'fence phase'}".split(" after")[0]
        )

    # -- the pods --------------------------------------------------------------------------

    @rule(pods=st.sets(st.sampled_from(POD_NAMES), min_size=1))
    def pods_confirm_by_reading(self, pods: set[str]) -> None:
        """Some pods read the state (a confirmation read, or the re-read a poll asks for)."""
        for pod in pods:
            model = self.pods[pod]
            if not (model.cut_off or model.paused):
                model.learn(self.current)
                model.confirmed_at = self.now

    @rule(pod=st.sampled_from(POD_NAMES), back=st.integers(0, 4))
    def a_late_watch_event_arrives(self, pod: str, back: int) -> None:
        """Any state of the history may arrive, late or out of order; it confirms nothing."""
        model = self.pods[pod]
        if not model.paused:
            model.learn(self.history[max(0, len(self.history) - 1 - back)])

    @rule(pod=st.sampled_from(POD_NAMES))
    def pod_is_cut_off_or_reconnected(self, pod: str) -> None:
        self.pods[pod].cut_off = not self.pods[pod].cut_off

    @rule(pod=st.sampled_from(POD_NAMES))
    def pod_is_paused_or_resumed(self, pod: str) -> None:
        self.pods[pod].paused = not self.pods[pod].paused

    @rule(pod=st.sampled_from(POD_NAMES), key=st.sampled_from(KEYS))
    def a_write_arrives(self, pod: str, key: bytes) -> None:
        model = self.pods[pod]
        if model.paused or not model.accepts(key, self.now):
            return
        assert model.state is not None
        write = Write(key, model.group, model.state.generation, self.now)
        model.in_flight.append(write)
        self.writes.append(write)

    @rule(key=st.sampled_from(KEYS), index=st.sampled_from([0, 1]))
    def a_write_arrives_from_an_up_to_date_gateway(self, key: bytes, index: int) -> None:
        """Most writes come from a gateway routing on the newest state."""
        owner = view_of(self.current).write_owner(key)
        if isinstance(owner, str):
            self.a_write_arrives(f"{owner}-{index}", key)

    @precondition(lambda self: any(model.in_flight for model in self.pods.values()))
    @rule(pod=st.sampled_from(POD_NAMES), which=st.integers(0, 3))
    def a_write_finishes(self, pod: str, which: int) -> None:
        model = self.pods[pod]
        if model.in_flight and not model.paused:
            model.in_flight.pop(which % len(model.in_flight)).end = self.now

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        # The fence's assumption: a handler finishes within one lease of its acceptance.
        for model in self.pods.values():
            for write in [w for w in model.in_flight if self.now + seconds - w.start > LEASE]:
                model.in_flight.remove(write)
                write.end = write.start + LEASE
        self.now += seconds

    # -- what must hold --------------------------------------------------------------------

    @invariant()
    def no_key_is_written_by_two_groups_at_once(self) -> None:
        by_key: dict[bytes, list[Write]] = {}
        for write in self.writes:
            by_key.setdefault(write.key, []).append(write)
        for key, writes in by_key.items():
            for a in writes:
                for b in writes:
                    if a.group >= b.group:
                        continue
                    a_end = a.end if a.end is not None else float("inf")
                    b_end = b.end if b.end is not None else float("inf")
                    assert a_end <= b.start or b_end <= a.start, (
                        f"{key!r} written by {a.group} (generation {a.generation}, {a.start}..{a.end})"
                        f" and {b.group} (generation {b.generation}, {b.start}..{b.end}) at once"
                    )

    @invariant()
    def a_key_changes_group_only_in_generation_order(self) -> None:
        by_key: dict[bytes, list[Write]] = {}
        for write in self.writes:
            by_key.setdefault(write.key, []).append(write)
        for writes in by_key.values():
            ordered = sorted(writes, key=lambda w: w.start)
            for earlier, later in itertools.pairwise(ordered):
                if earlier.group != later.group:
                    assert later.generation > earlier.generation, (earlier, later)

    def teardown(self) -> None:
        groups_per_key = {k: {w.group for w in self.writes if w.key == k} for k in KEYS}
        if any(len(groups) > 1 for groups in groups_per_key.values()):
            event("a key was written by two groups, one after the other")

    @invariant()
    def generations_only_grow(self) -> None:
        generations = [s.generation for s in self.history]
        assert generations == sorted(set(generations))


PROTOCOL_SETTINGS = settings(
    max_examples=150, stateful_step_count=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_no_interleaving_lets_two_groups_write_one_key() -> None:
    run_state_machine_as_test(HandoffProtocol, settings=PROTOCOL_SETTINGS)


class ImmediateSwitch(HandoffProtocol):
    mode = "immediate"


def test_the_checker_finds_the_overlap_of_an_immediate_switch() -> None:
    """The negative control: switching every party at its own moment lets two groups write."""
    with pytest.raises(AssertionError, match=r"at once|generation"):
        run_state_machine_as_test(
            ImmediateSwitch,
            settings=settings(
                max_examples=2000,
                stateful_step_count=60,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                database=None,
                print_blob=False,
                phases=[Stage.generate],  # the first overlap found is the answer: no shrinking
            ),
        )
