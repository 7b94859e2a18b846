"""gateway/handoff.py's decisions on concrete states: a lease lowered by a direct commit never
shortens a later barrier (the state carries the longest lease used), and the fence phase's
deadline leaves a silent party under that lease the time it needs."""

from __future__ import annotations

from gateway.config import lease_margin
from gateway.handoff import Barrier, Desired, initial_state, next_state, view_lease
from gateway.shardstate import Phase, View


def text(groups: tuple[str, ...], lease: float) -> str:
    listed = "\n".join(f"  - {{name: {g}, endpoints: ['10.0.0.{i}:80']}}" for i, g in enumerate(groups, 1))
    return (
        "version: 1\n"
        f"handoff: {{fence_lease_seconds: {lease}, barrier_timeout_seconds: {2 * lease + 60}}}\n"
        f"groups:\n{listed}\n"
    )


def test_a_lowered_lease_is_remembered_by_every_later_barrier() -> None:
    first = initial_state(Desired.of(text(("g1", "g2"), 600)), 0.0, "a")
    assert first is not None and first.lease_floor == 0
    # Lowering the lease moves no key: committed directly, but the old lease is remembered.
    lowered = next_state(first, Desired.of(text(("g1", "g2"), 60)), 10.0, "a", barrier_holds=False)
    assert lowered is not None and lowered.phase is Phase.STABLE and lowered.lease_floor == 600
    # A reshard after it: its barrier and deadline assume the 600 s lease an old view may hold.
    fencing = next_state(lowered, Desired.of(text(("g1", "g2", "g3"), 60)), 20.0, "a", barrier_holds=False)
    assert fencing is not None and fencing.phase is Phase.FENCING and fencing.lease_floor == 600
    view = View.of(fencing)
    assert view.lease == 60 and view.barrier_lease == view_lease(view) == 600
    barrier = Barrier(fencing.generation, observed_at=100.0, lease=view_lease(view))
    assert barrier.silent_deadline == 100.0 + 2 * 600 + lease_margin(600)
    assert fencing.deadline is not None
    assert fencing.deadline - fencing.since >= 2 * 600 + lease_margin(600)  # not the config's 180 s
    # And the floor outlives the hand-off.
    committed = next_state(fencing, Desired.of(text(("g1", "g2", "g3"), 60)), 30.0, "a", barrier_holds=True)
    assert committed is not None and committed.phase is Phase.STABLE and committed.lease_floor == 600


def test_without_a_longer_lease_in_play_the_config_timeout_is_the_deadline() -> None:
    first = initial_state(Desired.of(text(("g1", "g2"), 10)), 0.0, "a")
    assert first is not None
    fencing = next_state(first, Desired.of(text(("g1", "g2", "g3"), 10)), 5.0, "a", barrier_holds=False)
    assert fencing is not None and fencing.deadline == 5.0 + 2 * 10 + 60
