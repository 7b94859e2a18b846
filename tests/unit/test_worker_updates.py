"""A worker's topology updates: in order, a new ring built in a thread, the newest one winning.

Real rings, real threads, a real event loop: ``TopologyUpdates`` as ``gateway.workers`` runs it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import workers
from gateway.config import ShardConfig
from gateway.ipc import TopologyUpdate
from gateway.ring import ShardRing
from gateway.topology import DiscoveredPod, PodState, Topology, TopologyBuilder, TopologyHolder
from gateway.workers import TopologyUpdates


def config(groups: int, *, weight_of_first: int = 1, reads: str = "any") -> ShardConfig:
    return ShardConfig.model_validate(
        {
            "version": 1,
            "routing": {"reads": reads},
            "groups": [
                {"name": f"g-{i}", "weight": weight_of_first if i == 0 else 1, "service": f"svc-{i}"}
                for i in range(groups)
            ],
        }
    )


def update(cfg: ShardConfig, ready: int = 1) -> TopologyUpdate:
    pods = {
        g.name: [DiscoveredPod(f"10.0.{n}.{p}", 8080, PodState.READY) for p in range(ready)]
        for n, g in enumerate(cfg.groups)
    }
    return TopologyUpdate(config=cfg, pods=pods)


class Gate:
    """Holds every ring build (in its thread) until ``open()``; counts the builds started."""

    def __init__(self) -> None:
        self.started = 0
        self._lock = threading.Lock()
        self._open = threading.Event()

    def ring(self, cfg: ShardConfig) -> ShardRing:
        with self._lock:
            self.started += 1
        assert self._open.wait(30), "ring build never released"
        return ShardRing(cfg)

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    async def building(self, count: int) -> None:
        """Return once ``count`` builds have started (and are held)."""
        while True:
            with self._lock:
                if self.started >= count:
                    return
            await asyncio.sleep(0.001)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Ring builds in ``gateway.workers`` wait for the test: what happens meanwhile is exact."""
    held = Gate()
    monkeypatch.setattr(workers, "ShardRing", held.ring)
    yield held
    held.open()


class Harness:
    def __init__(self) -> None:
        self.builder = TopologyBuilder()
        self.holder = TopologyHolder(log_changes=False)
        self.swapped: list[Topology] = []
        self.holder.subscribe(self.swapped.append)
        self.updates = TopologyUpdates(self.builder, self.holder)

    def epochs(self) -> list[str]:
        return [t.epoch for t in self.swapped]


def run(test: Any) -> None:
    asyncio.run(asyncio.wait_for(test(Harness()), 60))


def epoch_of(message: TopologyUpdate) -> str:
    return TopologyBuilder().build(message.config, message.pods).epoch


def test_a_pod_only_change_is_applied_at_once_on_the_loop(gate: Gate) -> None:
    async def test(h: Harness) -> None:
        first = update(config(8))
        h.updates.apply_now(first)  # the worker's start: before it serves
        ring = h.holder.current.ring if h.holder.current else None
        more_pods = update(config(8), ready=3)
        h.updates.submit(more_pods)
        # Swapped before submit returned: no thread, no await.
        assert not h.updates.building and gate.started == 0
        current = h.holder.current
        assert current is not None and current.ring is ring and len(current.ready) == 8 * 3
        routing_only = update(config(8, reads="owner"))
        h.updates.submit(routing_only)
        assert h.holder.current is not None and h.holder.current.reads == "owner"
        assert gate.started == 0

    run(test)


def test_a_new_ring_is_built_in_a_thread_while_the_old_snapshot_serves(gate: Gate) -> None:
    async def test(h: Harness) -> None:
        h.updates.apply_now(update(config(8)))
        old = h.holder.current
        grown = update(config(9))
        h.updates.submit(grown)
        assert h.updates.building
        # The loop runs on (this coroutine does) while the ring is held in its thread.
        await gate.building(1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert h.holder.current is old and len(h.swapped) == 1
        gate.open()
        await h.updates.settled()
        assert h.epochs()[-1] == epoch_of(grown) and len(h.swapped) == 2
        assert h.holder.current is not None and h.holder.current.ring is not None
        assert len(h.holder.current.ring.groups) == 9
        assert h.updates.rings_built_off_loop == 1

    run(test)


def test_a_newer_topology_supersedes_one_whose_ring_is_building(gate: Gate) -> None:
    async def test(h: Harness) -> None:
        h.updates.apply_now(update(config(8)))
        nine, ten = update(config(9)), update(config(10))
        h.updates.submit(nine)
        await gate.building(1)
        h.updates.submit(ten)  # another ring: nine's is dropped once built
        gate.open()
        await h.updates.settled()
        assert h.epochs()[1:] == [epoch_of(ten)], "nine was applied, or ten was not"
        assert gate.started == 2 and h.updates.rings_built_off_loop == 2

    run(test)


def test_messages_during_a_build_keep_their_order(gate: Gate) -> None:
    """A pod-only change of the config being built waits for its ring (and reuses it); a
    change back to the ring in force, sent last, wins over the build before it."""

    async def test(h: Harness) -> None:
        h.updates.apply_now(update(config(8)))
        h.updates.submit(update(config(9)))
        await gate.building(1)
        nine_more_pods = update(config(9), ready=2)
        h.updates.submit(nine_more_pods)  # same ring as the one building
        assert len(h.swapped) == 1, "applied before the ring it needs"
        gate.open()
        await h.updates.settled()
        assert h.epochs()[1:] == [epoch_of(nine_more_pods)]
        assert gate.started == 1, "the ring built was not reused for the newer message"
        current = h.holder.current
        assert current is not None and len(current.ready) == 9 * 2

        gate.close()
        h.updates.submit(update(config(9, weight_of_first=2)))
        await gate.building(2)
        back = update(config(9), ready=1)  # the ring in force again
        h.updates.submit(back)
        assert len(h.swapped) == 2, "a pod-only change overtook the build before it"
        gate.open()
        await h.updates.settled()
        assert h.epochs()[2:] == [epoch_of(back)]
        assert h.holder.current is not None and h.holder.current.ring is current.ring

    run(test)
