"""``file_coordinator``: the state file beside the config file, one process that always leads,
backends behind ``Fence.from_file``. A hand-off end to end, and a loop that survives rounds
that fail."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.coordination import Coordinator, file_coordinator
from gateway.fence import Fence
from gateway.shardstate import Phase, ShardState, state_file_path
from tests.coordination.conftest import (
    GROUPS,
    SHRUNK,
    Backend,
    Pods,
    config_text,
    eventually,
    moving_key,
    run,
    serve_backend,
    silent_address,
)


def read_state(path: Path) -> ShardState | None:
    try:
        return ShardState.from_json(path.read_text())
    except FileNotFoundError:
        return None


def at_generation(path: Path, generation: int) -> bool:
    state = read_state(path)
    return state is not None and state.generation >= generation


def fenced(config: Path, group: str, pod: str) -> Fence:
    return Fence.from_file(str(config), group=group, poll_interval=0.05, pod=pod)


def confirmed(backend: Backend, generation: int) -> Any:
    async def check() -> bool:
        state = await backend.fence_state()
        return bool(state["generation"] == generation and state["confirmed"])

    return check


@contextlib.asynccontextmanager
async def running(coordinator: Coordinator) -> Any:
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.stop()


def test_a_file_fleet_hands_off_end_to_end(tmp_path: Path) -> None:
    # Lease 5 s: a silent participant counts as stopped only after 12 s; the commit below comes
    # from the fences' reports (barrier_held_by says which).
    config = tmp_path / "shards.yaml"
    state_path = Path(state_file_path(str(config)))
    key = moving_key(GROUPS, SHRUNK, "g3")
    seen: list[tuple[int, str]] = []

    async def scenario() -> None:
        async with (
            serve_backend("g3", fenced(config, "g3", "g3-0")) as losing,
            serve_backend("g3", document={"no": "fence"}) as unfenced,
            serve_backend("g1", fenced(config, "g1", "g1-0")) as keeping,
        ):
            # The file source's groups list their pods: the coordinator finds the losing group's
            # in the config in force (the gateway's discovery need not know them).
            endpoints = {
                "g1": [keeping.address],
                "g2": [silent_address()],
                "g3": [losing.address, unfenced.address],
            }
            before = config_text(GROUPS, lease=5, timeout=30, endpoints=endpoints)
            after = config_text(SHRUNK, lease=5, timeout=30, endpoints=endpoints)
            config.write_text(before)
            pods = Pods()
            coordinator = file_coordinator(
                str(config), "gw-a", config.read_text, pods, interval=0.05, stable_interval=0.2
            )
            async with running(coordinator):
                assert await eventually(lambda: at_generation(state_path, 1))
                assert await eventually(confirmed(losing, 1))
                release = losing.gate(key)
                write = asyncio.create_task(losing.write(key))
                await asyncio.wait_for(losing.entered[key].wait(), 10)

                config.write_text(after)
                coordinator.desired_changed()  # as the gateway's file watch will
                assert await eventually(lambda: at_generation(state_path, 2))
                state = read_state(state_path)
                assert state is not None and state.phase is Phase.FENCING and state.next == after
                assert await eventually(lambda: losing.probes_of(2) >= 4)
                assert coordinator.describe()["waiting_for"] == [f"pod:{losing.address}"]
                # The fence refuses the moving key now; the write it accepted before still runs.
                status, body = await losing.write(key)
                seen.append((status, body.get("error") if isinstance(body, dict) else None))
                assert read_state(state_path) == state  # no commit while the write runs

                release.set()
                results = await write
                assert results[0] == 200
                assert await eventually(lambda: at_generation(state_path, 3))
                assert await eventually(lambda: coordinator.describe()["generation"] == 3)
                described = coordinator.describe()
                assert described["barrier_held_by"] == "reports", described
                assert described["unfenced"] == [unfenced.address]
                assert described["leader"] is True and described["phase"] == "stable"
                assert await eventually(confirmed(losing, 3))
                assert keeping.probes == []

    run(scenario)
    final = read_state(state_path)
    assert final is not None and (final.generation, final.phase) == (3, Phase.STABLE)
    assert final.config == config.read_text()
    assert (final.outcome or "").startswith("committed after")
    assert seen == [(421, "shard_moving")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shards.yaml",
        "shards.yaml.state",
        "shards.yaml.state.lock",
    ]


def test_a_round_that_fails_is_logged_once_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before, after = config_text(hold=2.0), config_text(hold=1.0)
    config = tmp_path / "shards.yaml"
    state_path = Path(state_file_path(str(config)))
    desired: list[str | None] = [None]  # the gateway has not loaded a config yet
    coordinator = file_coordinator(
        str(config), "gw-a", lambda: desired[0], Pods(), interval=0.05, stable_interval=0.1, backoff_max=0.3
    )

    async def scenario() -> None:
        async with running(coordinator):
            # No desired config: nothing to create, round after round.
            assert await eventually(lambda: coordinator.rounds >= 3)
            assert not state_path.exists()
            desired[0] = before
            coordinator.desired_changed()
            assert await eventually(lambda: at_generation(state_path, 1))

            state_path.write_text('{"version": 1, "generation": "one"}')  # a hand edit gone wrong
            assert await eventually(lambda: coordinator.failures >= 3)
            assert "invalid shard state" in str(coordinator.describe()["last_error"])

            good = ShardState(generation=4, phase=Phase.STABLE, config=before, since=0.0, leader="someone")
            scratch = tmp_path / "fixed.tmp"
            scratch.write_text(good.to_json())
            scratch.replace(state_path)  # fixed by hand
            desired[0] = after
            coordinator.desired_changed()
            assert await eventually(lambda: at_generation(state_path, 5))
            assert await eventually(lambda: coordinator.failures == 0)  # (once the round is over)
            assert coordinator.describe()["last_error"] is None

    with caplog.at_level(logging.WARNING, logger="shardgate.coordinator"):
        run(scenario)
    failed = [r for r in caplog.records if "round failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]  # once while it lasts, not per round
    final = read_state(state_path)
    assert final is not None and (final.generation, final.config, final.leader) == (5, after, "gw-a")
