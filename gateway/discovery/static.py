"""Static config source: a shard-config file, re-read when it changes and on SIGHUP.

An invalid new file never replaces a good one (DESIGN invariant 5): the problem is logged
with its field path, counted, and shown in /debug/ring, and the last good config stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from gateway.config import ConfigError, ShardConfig, parse_shard_config
from gateway.observability.metrics import Metrics
from gateway.topology import TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate.config")


@dataclass
class ConfigStatus:
    """What /debug/ring reports about the config source."""

    source: str
    loaded_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    problems: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "loaded_at": self.loaded_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "problems": self.problems,
        }


class StaticFileSource:
    def __init__(
        self,
        path: str,
        builder: TopologyBuilder,
        holder: TopologyHolder,
        metrics: Metrics,
        poll_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.status = ConfigStatus(source=f"file:{path}")
        self._builder = builder
        self._holder = holder
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._stat: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._config: ShardConfig | None = None
        self._task: asyncio.Task[None] | None = None

    def load_initial(self) -> None:
        """First load; raises ConfigError so that `shardgate run` fails fast on a bad file."""
        if not self.reload(force=True):
            raise ConfigError(self.status.problems)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                self.reload()
            except Exception:  # a bug here must not stop watching
                log.exception("config reload failed unexpectedly")

    def reload(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or when forced); return whether a config is in force."""
        try:
            st = os.stat(self.path)
            stat = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            if force or self._stat is not None:
                self._reject([f"{self.path}: cannot read: {exc.strerror or exc}"])
            self._stat = None
            return self._config is not None
        if not force and stat == self._stat:
            return self._config is not None
        self._stat = stat
        try:
            with open(self.path, "rb") as handle:
                text = handle.read()
        except OSError as exc:
            self._reject([f"{self.path}: cannot read: {exc.strerror or exc}"])
            return self._config is not None
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._digest and self._config is not None:
            self._metrics.reload("unchanged")
            return True
        try:
            config = parse_shard_config(text)
        except ConfigError as exc:
            self._digest = digest
            self._reject(exc.problems)
            return self._config is not None
        self._digest = digest
        self._config = config
        self._holder.swap(self._builder.build(config))
        self._metrics.reload("applied")
        self.status.loaded_at = time.time()
        self.status.last_error = None
        self.status.problems = []
        return True

    def _reject(self, problems: list[str]) -> None:
        self._metrics.reload("rejected")
        self.status.problems = problems
        self.status.last_error = "; ".join(problems)
        self.status.last_error_at = time.time()
        kept = "keeping the last good config" if self._config is not None else "no config loaded"
        for problem in problems:
            log.error("shard config rejected (%s): %s", kept, problem)
