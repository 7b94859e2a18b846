"""The gateway process: config source -> topology -> data plane, plus the admin server.

Start order: load the config (fail fast if the first one is bad), bind the data plane, bind
the admin port (so /readyz cannot say 200 before the data port accepts), then start watching
for config changes. Stop order follows the contract's
Lifecycle section: not ready at once, keep serving for the drain delay, stop accepting,
let in-flight requests finish up to the grace timeout, close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import os

import uvloop

from gateway import build
from gateway.admin import AdminApp, AdminServer
from gateway.control import ControlPlane
from gateway.lifecycle import run_until_stopped
from gateway.observability.logs import AccessLog
from gateway.observability.tracing import tracing_from_env
from gateway.proxy.context import ProxyContext
from gateway.proxy.plane import BarrierReports, DataPlane
from gateway.settings import Settings
from gateway.workers import Supervisor

log = logging.getLogger("shardgate")


class Gateway:
    """A single-process gateway: control plane, data plane and admin server in one event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.control = ControlPlane(settings)
        self.metrics = self.control.metrics
        self.holder = self.control.holder
        self.data = DataPlane(
            settings.listen,
            settings.limits,
            self.holder,
            self.metrics,
            tracing=tracing_from_env(os.environ),
            access_log=AccessLog(settings.access_log, settings.slow_request_seconds),
            read_state_soon=self.control.read_state_soon,
        )
        BarrierReports(self.data.moving_writes_in_flight, self.holder, self.control.report)
        self.draining = False
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._admin: AdminServer | None = None

    async def start(self) -> None:
        control = self.control
        control.load_initial()
        # The data plane binds first: /readyz must never say 200 before the port accepts.
        await self.data.start()
        self.listen_address = self.data.listen_address
        admin = AdminApp(
            self.holder,
            self.metrics,
            lambda: self.draining,
            control.describe_source,
            control.watches,
            pod_stats=self.data.pod_stats,
            pod_health=self.data.pod_health,
        )
        try:
            self._admin = await AdminServer.start(admin, self.settings.admin_listen)
        except OSError:
            await self.data.stop(0)
            raise
        self.admin_address = self._admin.address
        control.start()
        assert self.listen_address is not None
        log.info(
            "shardgate listening on %s:%d (admin %s:%d), epoch %s, compiled modules: %s",
            *self.listen_address,
            *self.admin_address,
            self.holder.current.epoch if self.holder.current else None,
            ", ".join(build.compiled_modules()) or "none (pure Python)",
        )

    @property
    def ctx(self) -> ProxyContext | None:
        return self.data.ctx

    def reload_config(self) -> None:
        self.control.reload()

    def begin_drain(self) -> None:
        """Readiness turns 503 at once; requests are still served until ``stop``."""
        self.draining = True
        self.data.begin_drain()

    def exit_now(self) -> None:
        """Nothing outlives this process: the second signal just exits."""

    async def stop(self, grace_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight exchanges finish (up to the grace timeout), close the rest."""
        self.draining = True
        await self.data.stop(self.settings.grace_timeout if grace_timeout is None else grace_timeout)
        await self.control.stop()
        if self._admin is not None:
            await self._admin.stop()


def run_gateway(settings: Settings) -> int:
    process = Gateway(settings) if settings.workers == 1 else Supervisor(settings)
    main = run_until_stopped(process, settings.drain_delay)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
