"""Static config source: a shard-config file, re-read when it changes and on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os

from gateway.config import ConfigError
from gateway.discovery.source import ConfigApplier, ConfigStatus
from gateway.observability.metrics import Metrics
from gateway.topology import TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate.config")


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
        self._applier = ConfigApplier(f"file:{path}", builder, holder, metrics)
        self._poll_interval = poll_interval
        self._stat: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> ConfigStatus:
        return self._applier.status

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
        applier = self._applier
        try:
            st = os.stat(self.path)
            stat = (st.st_mtime_ns, st.st_size, st.st_ino)
            if force or stat != self._stat:
                self._stat = stat
                with open(self.path, "rb") as handle:
                    config = applier.parse(handle.read())
                if config is not None:
                    if self._task is None:
                        applier.apply(config)  # at start: nothing to stall yet
                    else:
                        applier.apply_soon(config)
        except OSError as exc:
            if force or self._stat is not None:
                applier.reject([f"{self.path}: cannot read: {exc.strerror or exc}"])
                applier.forget_digest()
            self._stat = None
        return applier.config is not None
