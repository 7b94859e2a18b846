"""The coordinator against the API-server double (the real client, one token per party) and
backends behind the real fence: the first state, direct commits, hand-offs whose barrier waits
for a write in flight, a replica on an old generation (rollback, and no retry before its time),
a silent pod, two coordinators that both believe they lead, and a desired config reverted
during the fence phase.

Every test watches the state ConfigMap (``StateHistory``) and checks the history it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.config import parse_shard_config
from gateway.coordination import (
    ConfigMapStateStore,
    Coordinator,
    PodProber,
    ReplicaRegistry,
    SoleLeader,
    kubernetes_coordinator,
)
from gateway.handoff import lease_margin
from gateway.ring import config_epoch
from gateway.shardstate import STATE_KEY, Phase, ShardState
from tests.coordination.conftest import (
    CONFIGMAP,
    FAST,
    GROUPS,
    GROWN,
    NS,
    SHRUNK,
    STATE_CONFIGMAP,
    Backend,
    Desired,
    Kube,
    Pods,
    StateHistory,
    assert_linear,
    config_text,
    configmap_fence,
    eventually,
    moving_key,
    reporting_as_gateway,
    run,
    serve_backend,
    silent_address,
    state_of,
)
from tests.k8s.apiserver import FakeApiServer


@pytest.fixture
def history(kube: Kube) -> Iterator[StateHistory]:
    with StateHistory(kube.factory("history")) as watched:
        yield watched


def coordinator(kube: Kube, identity: str, desired: Desired, pods: Pods, **timing: Any) -> Coordinator:
    made = kubernetes_coordinator(
        kube.factory(identity), NS, CONFIGMAP, identity, desired, pods, **(FAST | timing)
    )
    desired.listeners.append(made.desired_changed)
    return made


@contextlib.asynccontextmanager
async def running(*coordinators: Coordinator) -> AsyncIterator[None]:
    for each in coordinators:
        await each.start()
    try:
        yield
    finally:
        for each in coordinators:
            await each.stop()


def at_generation(api: FakeApiServer, generation: int) -> bool:
    state = state_of(api)
    return state is not None and state.generation >= generation


def knows(coordinator: Coordinator, generation: int) -> Any:
    """The coordinator has taken in its own write of ``generation`` (a moment after the store
    shows it: it derives the state's facts first)."""
    return lambda: coordinator.describe()["generation"] == generation


def test_without_a_state_the_leader_writes_the_first_one_from_the_desired_config(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    text = config_text()
    desired = Desired(text)
    gateway = coordinator(kube, "gw-a", desired, Pods())

    async def scenario() -> None:
        async with running(gateway):
            assert await eventually(lambda: at_generation(api, 1))
            state = state_of(api)
            assert state is not None
            assert (state.generation, state.phase, state.config) == (1, Phase.STABLE, text)
            assert (state.leader, state.outcome) == ("gw-a", "initial")
            # Nothing more to do: rounds go on, and write nothing.
            version = api.get_object("configmaps", NS, f"{CONFIGMAP}-state")["metadata"]["resourceVersion"]  # type: ignore[index]
            rounds = gateway.rounds
            assert await eventually(lambda: gateway.rounds >= rounds + 3)
            now = api.get_object("configmaps", NS, f"{CONFIGMAP}-state")
            assert now is not None and now["metadata"]["resourceVersion"] == version
            described = gateway.describe()
            assert described["leader"] is True and described["generation"] == 1
            assert described["epoch"] == config_epoch(parse_shard_config(text))

    run(scenario)
    assert history.generations() == [1]


def test_a_change_that_moves_no_key_is_committed_directly(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    before, after = config_text(hold=2.0), config_text(hold=1.0)  # the hold time only
    desired = Desired(before)

    async def scenario() -> None:
        async with serve_backend("g3") as pod:  # a pod of every group: none may be asked
            gateway = coordinator(kube, "gw-a", desired, Pods({g: [pod.address] for g in GROUPS}))
            async with running(gateway):
                assert await eventually(lambda: at_generation(api, 1))
                desired.set(after)
                assert await eventually(lambda: at_generation(api, 2))
            assert pod.probes == []

    run(scenario)
    states = history.snapshot()
    assert [(s.generation, s.phase, s.config) for s in states] == [
        (1, Phase.STABLE, before),
        (2, Phase.STABLE, after),
    ]
    assert states[1].outcome == "committed (no key moves)"


def test_the_barrier_waits_for_a_fenced_pod_with_a_write_in_flight_for_a_moving_key(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    # A lease of 5 s: a silent participant would count as stopped only after 12 s, so a commit
    # before that is the pods' reports (checked below through barrier_held_by).
    before, after = config_text(GROUPS, lease=5, timeout=30), config_text(SHRUNK, lease=5, timeout=30)
    key = moving_key(GROUPS, SHRUNK, "g3")
    desired = Desired(before)

    async def scenario() -> None:
        async with (
            serve_backend("g3", configmap_fence(kube, "g3", "g3-0")) as losing,
            serve_backend("g1", configmap_fence(kube, "g1", "g1-0")) as keeping,
        ):
            pods = Pods({"g1": [keeping.address], "g3": [losing.address]})
            gateway = coordinator(kube, "gw-a", desired, pods)
            async with running(gateway), reporting_as_gateway(api, gateway.registry):
                assert await eventually(lambda: at_generation(api, 1))
                assert await eventually(async_confirmed(losing, 1))
                release = losing.gate(key)
                write = asyncio.create_task(losing.write(key))  # accepted under generation 1
                await asyncio.wait_for(losing.entered[key].wait(), 10)

                desired.set(after)
                assert await eventually(lambda: at_generation(api, 2))
                # The pod applied generation 2 and still runs the write: the barrier waits, round
                # after round.
                assert await eventually(lambda: losing.probes_of(2) >= 4)
                assert (await losing.fence_state())["moving_writes_in_flight"] == 1
                described = gateway.describe()
                assert described["phase"] == "fencing" and described["waiting_for"] == [
                    f"pod:{losing.address}"
                ]
                state = state_of(api)
                assert state is not None and (state.generation, state.phase) == (2, Phase.FENCING)

                release.set()
                assert (await write)[0] == 200
                assert await eventually(lambda: at_generation(api, 3))
                assert await eventually(knows(gateway, 3))
                described = gateway.describe()
                assert described["barrier_held_by"] == "reports", described
                assert keeping.probes == []  # a group that loses no key is no participant

    run(scenario)
    states = history.snapshot()
    assert_linear(states)
    assert [(s.generation, s.phase) for s in states] == [
        (1, Phase.STABLE),
        (2, Phase.FENCING),
        (3, Phase.STABLE),
    ]
    assert states[1].next == after and states[2].config == after
    assert (states[2].outcome or "").startswith("committed after")


def async_confirmed(backend: Backend, generation: int) -> Any:
    async def check() -> bool:
        state = await backend.fence_state()
        return bool(state["generation"] == generation and state["confirmed"])

    return check


def test_a_leader_that_takes_over_a_late_fence_phase_rolls_it_back_and_retries_after_a_while(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    # A valid config's deadline is beyond the silent deadline of a barrier the leader saw begin
    # (timeout > 2 x lease + margin), so a continuous leader always commits. A leader that takes
    # over a fence phase another one began long ago starts its own silent deadline when it first
    # sees it: past the state's deadline, a replica stuck on generation 1 forces the rollback.
    before = config_text(GROUPS, lease=1, timeout=4.5)
    after = config_text(SHRUNK, lease=1, timeout=4.5)
    other = config_text(GROWN, lease=1, timeout=4.5)
    desired = Desired(after)
    now = time.time()
    first = ShardState(generation=1, phase=Phase.STABLE, config=before, since=now - 60)
    begun = ShardState(
        generation=2, phase=Phase.FENCING, config=before, next=after, since=now - 3, deadline=now + 1.5
    )
    api.put_configmap(NS, STATE_CONFIGMAP, {STATE_KEY: first.to_json()})
    api.put_configmap(NS, STATE_CONFIGMAP, {STATE_KEY: begun.to_json()})

    async def scenario() -> None:
        stuck = ReplicaRegistry(
            kube.factory("gw-b"), NS, CONFIGMAP, "gw-b", lease_duration=2, renew_interval=0.3
        )
        gateway = coordinator(kube, "gw-a", desired, Pods())
        await stuck.start()
        try:
            stuck.report(1, 0)
            assert await eventually(
                lambda: api.get_object("leases", NS, f"{CONFIGMAP}-replica-gw-b") is not None
            )
            async with running(gateway), reporting_as_gateway(api, gateway.registry):
                assert await eventually(lambda: at_generation(api, 3), timeout=10)
                rolled_back = state_of(api)
                assert rolled_back is not None and rolled_back.config == before
                assert rolled_back.outcome == "rolled back: barrier not reached in time"
                assert await eventually(knows(gateway, 3))
                described = gateway.describe()
                assert described["last_rollback"] == {
                    "generation": 3,
                    "reason": "rolled back: barrier not reached in time",
                    "waiting_for": ["group:g3", "replica:gw-b"],  # (g3's pods: none known)
                }
                retry_not_before = described["retry_not_before"]
                assert isinstance(retry_not_before, float) and retry_not_before >= rolled_back.since + 4.5

                # The same desired text is tried again, not before retry_not_before; this time the
                # leader saw the fence phase begin, so the silent deadline comes first: a commit.
                assert await eventually(lambda: at_generation(api, 4), timeout=15)
                retried = state_of(api)
                assert retried is not None and retried.phase is Phase.FENCING and retried.next == after
                assert retried.since >= retry_not_before, (retried.since, retry_not_before)
                assert await eventually(lambda: at_generation(api, 5), timeout=15)
                committed = state_of(api)
                assert committed is not None and committed.config == after
                assert committed.outcome is not None and committed.outcome.startswith("committed")

                # A different desired text starts a hand-off at once.
                desired.set(other)
                assert await eventually(lambda: at_generation(api, 6))
                started = state_of(api)
                assert started is not None and started.phase is Phase.FENCING and started.next == other
        finally:
            await stuck.stop()

    run(scenario)
    # (the history's watch may begin before or after the first of the two puts above)
    states = [s for s in history.snapshot() if s.generation >= 2]
    assert [s.generation for s in states[:5]] == [2, 3, 4, 5, 6]
    assert [s.phase for s in states[:5]] == [Phase.FENCING, Phase.STABLE] * 2 + [Phase.FENCING]


def test_a_silent_pod_counts_as_stopped_after_two_leases_and_the_margin(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    lease = 1.0
    before, after = config_text(GROUPS, lease=lease, timeout=8), config_text(SHRUNK, lease=lease, timeout=8)
    desired = Desired(before)
    silent = silent_address()
    gateway = coordinator(kube, "gw-a", desired, Pods({"g3": [silent]}))

    async def scenario() -> None:
        async with running(gateway), reporting_as_gateway(api, gateway.registry):
            assert await eventually(lambda: at_generation(api, 1))
            desired.set(after)
            assert await eventually(lambda: at_generation(api, 2))
            assert await eventually(lambda: gateway.describe()["waiting_for"] == [f"pod:{silent}"])
            assert await eventually(lambda: at_generation(api, 3))
            assert await eventually(knows(gateway, 3))
            assert gateway.describe()["barrier_held_by"] == "silent deadline"

    run(scenario)
    states = history.snapshot()
    assert_linear(states)
    fencing, committed = states[1], states[2]
    assert committed.config == after and (committed.outcome or "").startswith("committed after")
    # Written no sooner than 2 x lease + margin after the fencing state (whose `since` is taken
    # before it is written, so this is a lower bound of what the barrier waited).
    assert committed.since - fencing.since >= 2 * lease + lease_margin(lease)


def test_two_coordinators_that_both_believe_they_lead_write_one_linear_history(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    """No leader election (both always lead): the compare-and-swap alone keeps the history linear.
    A lost update would show as one generation written twice, or a gap."""
    a_groups, b_groups = GROUPS, SHRUNK
    texts = [
        config_text(b_groups, lease=5, timeout=30),  # g3's keys move: a hand-off
        config_text(a_groups, lease=5, timeout=30),  # back: g1 and g2 lose keys to g3
        config_text(a_groups, lease=5, timeout=30, hold=1.0),  # nothing moves: a direct commit
        config_text(b_groups, lease=5, timeout=30, hold=1.0),
        config_text(a_groups, lease=5, timeout=30),
    ]
    desired = Desired(config_text(a_groups, lease=5, timeout=30))

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            backends = {
                g: await stack.enter_async_context(serve_backend(g, configmap_fence(kube, g, f"{g}-0")))
                for g in GROUPS
            }
            pods = Pods({g: [b.address] for g, b in backends.items()})
            both = [
                Coordinator(
                    identity=name,
                    store=ConfigMapStateStore(kube.factory(name), NS, CONFIGMAP),
                    election=SoleLeader(name),
                    registry=None,
                    prober=PodProber(),
                    desired=desired,
                    pods_of=pods,
                    interval=0.05,
                    stable_interval=0.2,
                )
                for name in ("gw-a", "gw-b")
            ]
            for each in both:
                desired.listeners.append(each.desired_changed)
            async with running(*both):
                for text in texts:
                    desired.set(text)

                    def settled(text: str = text) -> bool:
                        state = state_of(api)
                        return state is not None and state.phase is Phase.STABLE and state.config == text

                    assert await eventually(settled, timeout=25), (history.generations(), state_of(api))
            conflicts = sum(each.conflicts for each in both)
            print(
                f"compare-and-swap conflicts: {conflicts}; writers: {[s.leader for s in history.snapshot()]}"
            )

    run(scenario)
    states = history.snapshot()
    assert_linear(states)
    final = state_of(api)
    assert final is not None and final.generation == states[-1].generation
    # Every hand-off ended with a commit (each barrier held on the fences' reports).
    assert all(
        (after.outcome or "").startswith("committed")
        for before, after in itertools.pairwise(states)
        if before.phase is Phase.FENCING
    )


def test_the_desired_config_reverted_during_the_fence_phase_rolls_back_at_once(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    # A silent pod keeps the barrier from holding for 2 x 10 + 2.1 s; the deadline is 30 s away.
    before, after = config_text(GROUPS, lease=10, timeout=30), config_text(SHRUNK, lease=10, timeout=30)
    desired = Desired(before)
    gateway = coordinator(kube, "gw-a", desired, Pods({"g3": [silent_address()]}))

    async def scenario() -> None:
        async with running(gateway), reporting_as_gateway(api, gateway.registry):
            assert await eventually(lambda: at_generation(api, 1))
            desired.set(after)
            assert await eventually(lambda: at_generation(api, 2))
            assert await eventually(lambda: len(gateway.describe()["waiting_for"]) == 1)  # type: ignore[arg-type]
            desired.set(before)
            assert await eventually(lambda: at_generation(api, 3))
            assert await eventually(knows(gateway, 3))
            assert gateway.describe()["retry_not_before"] is None
            # The operator applies it again: not held back as a timed-out hand-off would be.
            desired.set(after)
            assert await eventually(lambda: at_generation(api, 4))

    run(scenario)
    states = history.snapshot()
    assert_linear(states)
    fencing, reverted, again = states[1], states[2], states[3]
    assert reverted.config == before
    assert reverted.outcome == "rolled back: the desired config returned to the one in force"
    assert fencing.deadline is not None and reverted.since < fencing.deadline
    assert again.phase is Phase.FENCING and again.next == after


def test_only_the_elected_coordinator_writes_and_another_takes_over_when_it_stops(
    api: FakeApiServer, kube: Kube, history: StateHistory
) -> None:
    before, after = config_text(hold=2.0), config_text(hold=1.0)
    desired = Desired(before)
    a, b = coordinator(kube, "gw-a", desired, Pods()), coordinator(kube, "gw-b", desired, Pods())

    async def scenario() -> None:
        await a.start()
        await b.start()
        try:
            assert await eventually(lambda: at_generation(api, 1))
            leader, follower = (a, b) if a.election.leading else (b, a)
            assert not follower.election.leading and follower.rounds == 0
            await leader.stop()
            assert await eventually(lambda: follower.election.leading)
            desired.set(after)
            assert await eventually(lambda: at_generation(api, 2))
            state = state_of(api)
            assert state is not None and state.leader == follower.identity
            assert history.snapshot()[0].leader == leader.identity
        finally:
            await a.stop()
            await b.stop()

    run(scenario)
    assert_linear(history.snapshot())
