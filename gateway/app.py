"""The gateway process: config source -> topology -> data plane, plus the admin server.

Start order: load the config (fail fast if the first one is bad), bind the admin port, bind
the data plane, then start watching for config changes. Stop order follows the contract's
Lifecycle section: not ready at once, keep serving for the drain delay, stop accepting,
let in-flight requests finish up to the grace timeout, close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Iterable

import uvloop
from aiohttp import web

from gateway.admin import AdminApp
from gateway.config import ConfigError, Settings
from gateway.discovery.kubernetes import KubernetesSource, WatchStatus, WatchTiming
from gateway.discovery.static import StaticFileSource
from gateway.observability.metrics import Metrics
from gateway.proxy.context import ProxyContext
from gateway.proxy.server import ClientConnection
from gateway.proxy.upstream import close_idle
from gateway.topology import TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.holder = TopologyHolder()
        self.builder = TopologyBuilder(on_retire=close_idle)
        self.draining = False
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.ctx: ProxyContext | None = None
        self.source: StaticFileSource | KubernetesSource | None = None
        self._server: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.holder.subscribe(self._count_swap)
        watches: Callable[[], Iterable[WatchStatus]] = tuple
        if settings.config_path is not None:
            static = StaticFileSource(
                settings.config_path, self.builder, self.holder, self.metrics, settings.config_poll_interval
            )
            static.load_initial()  # a bad file at start is an operator error: fail fast
            self.source = static
            describe_source = static.status.describe
        else:
            # No config yet is normal in a cluster (readyz says 503 until the ConfigMap arrives).
            assert settings.configmap is not None
            kube = KubernetesSource(
                settings.configmap,
                settings.namespace,
                self.builder,
                self.holder,
                self.metrics,
                timing=WatchTiming(
                    watch_timeout=settings.watch_timeout, backoff_max=settings.watch_backoff_max
                ),
            )
            self.source = kube
            describe_source = kube.describe
            watches = kube.watch_statuses
        ctx = self.ctx = ProxyContext(loop, self.holder, self.metrics, settings.limits)

        admin = AdminApp(self.holder, self.metrics, lambda: self.draining, describe_source, watches)
        self._admin_runner = web.AppRunner(admin.app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin_socket = socket.create_server(settings.admin_listen, reuse_port=False)
        site = web.SockSite(self._admin_runner, admin_socket)
        await site.start()
        self.admin_address = admin_socket.getsockname()[:2]

        self._server = await loop.create_server(
            lambda: ClientConnection(ctx),
            settings.listen[0],
            settings.listen[1],
            reuse_address=True,
            backlog=2048,
        )
        self.listen_address = self._server.sockets[0].getsockname()[:2]
        ctx.start()
        self.source.start()
        log.info(
            "shardgate listening on %s:%d (admin %s:%d), epoch %s",
            *self.listen_address,
            *self.admin_address,
            self.holder.current.epoch if self.holder.current else None,
        )

    def _count_swap(self, topology: object) -> None:
        self.metrics.topology_swaps += 1

    def reload_config(self) -> None:
        if self.source is not None:
            self.source.reload(force=True)

    def begin_drain(self) -> None:
        """Readiness turns 503 at once; keep-alive responses start carrying Connection: close."""
        self.draining = True

    async def stop(self, grace_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight exchanges finish (up to the grace timeout), close the rest."""
        grace = self.settings.grace_timeout if grace_timeout is None else grace_timeout
        self.draining = True
        ctx = self.ctx
        if self._server is not None:
            self._server.close()
        if ctx is not None:
            ctx.draining = True
            ctx.close_idle_clients()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while ctx.clients and loop.time() < deadline:
                await asyncio.sleep(0.05)
                ctx.close_idle_clients()
            for client in list(ctx.clients):
                if client.transport is not None:
                    client.transport.abort()
            for upstream in list(ctx.upstreams):
                upstream.abort()
            await ctx.stop()
        if self.source is not None:
            await self.source.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()


async def serve(settings: Settings) -> int:
    gateway = Gateway(settings)
    try:
        await gateway.start()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await gateway.stop(0)
        return 1

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_stop_signal(signame: str) -> None:
        if stop_requested.is_set():
            log.warning("second %s: exiting at once", signame)
            raise SystemExit(1)
        log.info("%s: draining for %.1fs, then stopping", signame, settings.drain_delay)
        gateway.begin_drain()
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_config)

    await stop_requested.wait()
    await asyncio.sleep(settings.drain_delay)
    await gateway.stop()
    log.info("stopped")
    return 0


def run_gateway(settings: Settings) -> int:
    if settings.workers != 1:
        log.error("--workers %d: only one worker is supported in this build", settings.workers)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings))
