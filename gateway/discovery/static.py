"""Static config source: a shard-config file, re-read when it changes and on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from gateway.config import ConfigError, ShardConfig
from gateway.coordination.store import FileStateStore
from gateway.discovery.source import ConfigApplier, ConfigStatus
from gateway.fence import FileSource, StateFollower
from gateway.handoff import Desired, initial_state
from gateway.observability.metrics import Metrics
from gateway.shardstate import StateError, View
from gateway.tasks import log_if_it_fails
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
        *,
        state_path: str | None = None,
        on_desired: Callable[[], None] | None = None,
    ) -> None:
        """``state_path``: route on the shard state in that file (written by this process's
        hand-off coordinator) and hand the desired config, once validated, to ``on_desired``
        (``desired_text``); without it, apply the desired config itself."""
        self.path = path
        self._applier = ConfigApplier(f"file:{path}", builder, holder, metrics)
        self._poll_interval = poll_interval
        self._stat: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.state_path = state_path
        self.desired_text: str | None = None
        self._on_desired = on_desired
        self._follower: StateFollower | None = None
        self._follower_task: asyncio.Task[None] | None = None
        if state_path is not None:
            self._follower = StateFollower(FileSource(state_path, poll_interval / 2), "gateway")
            self._follower.subscribe(self._view_changed)

    @property
    def follower(self) -> StateFollower | None:
        return self._follower

    @property
    def status(self) -> ConfigStatus:
        return self._applier.status

    def load_initial(self) -> None:
        """First load; raises ConfigError so that `shardgate run` fails fast on a bad file."""
        if self.state_path is None:
            if not self.reload(force=True):
                raise ConfigError(self.status.problems)
            return
        self.reload(force=True)
        if self.desired_text is None:
            raise ConfigError(self.status.problems)
        self._applier.apply(*self._initial_state())

    def _initial_state(self) -> tuple[ShardConfig, None, None, View]:
        """The shard state in force at start: the state file's, or (none yet) the desired config
        as generation 1. A state left by an earlier run is kept: the hand-off then moves the
        fleet from it to the desired config."""
        assert self.state_path is not None and self.desired_text is not None
        store = FileStateStore(self.state_path)
        try:
            state = store.read_now()
            if state is None:
                first = initial_state(Desired.of(self.desired_text), time.time(), "startup")
                assert first is not None  # the desired config is valid
                state = store.create_now(first)
            view = View.of(state)
        except (StateError, OSError) as exc:
            raise ConfigError([f"{self.state_path}: {exc}"]) from None
        return view.current.config, None, None, view

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch())
        if self._follower is not None:
            started = loop.create_task(self._follower.start())
            self._follower_task = log_if_it_fails(started, "following the shard state", log)

    def _view_changed(self, view: View) -> None:
        self._applier.apply_soon(view.current.config, None, view)

    async def stop(self) -> None:
        if self._follower is not None:
            if self._follower_task is not None:
                await asyncio.gather(self._follower_task, return_exceptions=True)
            await self._follower.stop()
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
                    raw = handle.read()
                config = applier.parse(raw)
                if config is not None:
                    if self._follower is not None:
                        # The hand-off carries it out; what is applied is the shard state.
                        applier.accepted()
                        self.desired_text = raw.decode("utf-8")  # (valid: it parsed)
                        if self._on_desired is not None:
                            self._on_desired()
                    elif self._task is None:
                        applier.apply(config)  # at start: nothing to stall yet
                    else:
                        applier.apply_soon(config)
        except OSError as exc:
            if force or self._stat is not None:
                applier.reject([f"{self.path}: cannot read: {exc.strerror or exc}"])
                applier.forget_digest()
            self._stat = None
        return applier.config is not None or (self._follower is not None and self.desired_text is not None)
