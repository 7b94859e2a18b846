"""What every config source shares: validate a shard-config document, swap in topologies,
and report rejections (DESIGN invariant 5: a bad config never replaces a good one)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config import ConfigError, ShardConfig, parse_shard_config
from gateway.observability.metrics import Metrics
from gateway.ring import ShardRing
from gateway.shardstate import View
from gateway.topology import DiscoveredPod, TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate.config")

# Called when a queued config is applied, to get the pods discovery knows at that moment.
PodsNow = Callable[[], Mapping[str, Iterable[DiscoveredPod]]]


@dataclass
class ConfigStatus:
    """What /debug/ring reports about the config source."""

    source: str
    loaded_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    problems: list[str] = field(default_factory=list)
    note: str | None = None  # e.g. "configmap deleted: keeping the last good config"

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "loaded_at": self.loaded_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "problems": self.problems,
            "note": self.note,
        }


class ConfigApplier:
    def __init__(
        self, source: str, builder: TopologyBuilder, holder: TopologyHolder, metrics: Metrics
    ) -> None:
        self.status = ConfigStatus(source=source)
        self.config: ShardConfig | None = None
        self._builder = builder
        self._holder = holder
        self._metrics = metrics
        self._digest: str | None = None
        # The shard state's view whose config is in force, when the source follows a shard state
        # (docs/design/014-ownership-handoff.md); None when it applies the desired config itself.
        self.view: View | None = None
        self._next: tuple[ShardConfig, PodsNow | None, View | None] | None = None
        self._applying: asyncio.Task[None] | None = None
        self.swaps = 0
        self.last_swap_seconds = 0.0  # time the last snapshot swap took on the event loop

    def parse(self, text: str | bytes) -> ShardConfig | None:
        """A new valid config, or None when the text is unchanged or invalid (then reported)."""
        raw = text.encode() if isinstance(text, str) else text
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            self._metrics.reload("unchanged")
            return None
        self._digest = digest
        try:
            return parse_shard_config(raw)
        except ConfigError as exc:
            self.reject(exc.problems)
            return None

    def apply(
        self,
        config: ShardConfig,
        discovered: Mapping[str, Iterable[DiscoveredPod]] | None = None,
        ring: ShardRing | None = None,
        view: View | None = None,
    ) -> None:
        """Make ``config`` the one in force (a new epoch when it differs); ``view``: the shard
        state it comes from (then the reload was counted when the desired config was accepted)."""
        self.config = config
        self.view = view
        self.rebuild(discovered, ring)
        if view is None:
            self.accepted()

    def accepted(self) -> None:
        """A valid config arrived: counted as applied, the last rejection cleared. (With a shard
        state, the hand-off then puts it in force.)"""
        self._metrics.reload("applied")
        self.status.loaded_at = time.time()
        self.status.last_error = None
        self.status.problems = []
        self.status.note = None

    def apply_soon(
        self, config: ShardConfig, discovered: PodsNow | None = None, view: View | None = None
    ) -> None:
        """``apply`` from the event loop without stalling it: a new ring is built in a thread.

        Configs are applied in the order given; one submitted while a ring is being built
        replaces any other still waiting (only the newest matters).
        """
        self._next = (config, discovered, view)
        if self._applying is None or self._applying.done():
            self._applying = asyncio.get_running_loop().create_task(self._apply_queued())

    async def _apply_queued(self) -> None:
        while self._next is not None:
            config, discovered, view = self._next
            self._next = None
            ring = None
            if self._builder.needs_ring(config):
                ring = await asyncio.to_thread(ShardRing, config)
            if self._next is not None and self._next[0] is not config:
                continue  # superseded while the ring was being built
            self.apply(config, discovered() if discovered else None, ring, view)

    def rebuild(
        self, discovered: Mapping[str, Iterable[DiscoveredPod]] | None = None, ring: ShardRing | None = None
    ) -> None:
        """New snapshot of the config in force with the pods discovery knows now."""
        if self.config is not None:
            started = time.perf_counter()
            view = self.view
            topology = self._builder.build(
                self.config,
                discovered,
                ring,
                generation=view.generation if view is not None else None,
                handoff=view.handoff if view is not None else None,
            )
            self._holder.swap(topology)
            self.last_swap_seconds = time.perf_counter() - started
            self.swaps += 1

    def reject(self, problems: list[str]) -> None:
        self._metrics.reload("rejected")
        self.status.problems = problems
        self.status.last_error = "; ".join(problems)
        self.status.last_error_at = time.time()
        kept = "keeping the last good config" if self.config is not None else "no config loaded yet"
        for problem in problems:
            log.error("shard config rejected (%s): %s", kept, problem)

    def forget_digest(self) -> None:
        """Make the next parse of the same text count as new (after the source went away)."""
        self._digest = None
