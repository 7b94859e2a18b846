"""Admin server (aiohttp, its own port): health, readiness, metrics, debug views."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest

from gateway import build
from gateway.observability.metrics import GatewayCollector, Metrics, WatchView
from gateway.router import MISSING_KEY, REPEATED_KEY, Refusal, owner_group
from gateway.topology import PodHealthView, PodStats, TopologyHolder, no_health, unpooled_stats


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, default=str), status=status, content_type="application/json"
    )


def _error(status: int, code: str, detail: str) -> web.Response:
    return _json({"error": code, "detail": detail, "request_id": None}, status)


class AdminApp:
    def __init__(
        self,
        holder: TopologyHolder,
        metrics: Metrics,
        is_draining: Callable[[], bool],
        config_status: Callable[[], dict[str, object]],
        watches: Callable[[], Iterable[WatchView]] = tuple,
        *,
        workers_ready: Callable[[], str | None] = lambda: None,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
        pod_stats: PodStats = unpooled_stats,
        pod_health: PodHealthView = no_health,
        extra_debug: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._holder = holder
        self._is_draining = is_draining
        self._config_status = config_status
        self._workers_ready = workers_ready  # None when fine, else why not ready
        self._before_scrape = before_scrape
        self._extra_debug = extra_debug
        self._pod_stats = pod_stats
        self._pod_health = pod_health
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(
            GatewayCollector(metrics, lambda: holder.current, watches, pod_stats, pod_health)
        )
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/debug/ring", self.debug_ring)
        self.app.router.add_get("/debug/route", self.debug_route)

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is responsive.
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self._is_draining():
            return _json({"status": "draining"}, 503)
        if self._holder.current is None:
            return _json({"status": "no shard config loaded"}, 503)
        if self._holder.awaiting_confirmation:
            # Only at the start: a lease that runs out later refuses writes, and reads go on.
            return _json({"status": "shard state not confirmed yet"}, 503)
        problem = self._workers_ready()
        if problem is not None:
            return _json({"status": problem}, 503)
        return _json({"status": "ready", "epoch": self._holder.current.epoch})

    async def metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            await self._before_scrape()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def debug_ring(self, request: web.Request) -> web.Response:
        topology = self._holder.current
        data: dict[str, object] = {
            "config": self._config_status(),
            "draining": self._is_draining(),
            "build": build.describe(),
        }
        if self._extra_debug is not None:
            data.update(self._extra_debug())
        if topology is None:
            data.update({"epoch": None, "groups": [], "ring": None})
        else:
            data.update(topology.describe(self._pod_stats, self._pod_health))
        return _json(data)

    async def debug_route(self, request: web.Request) -> web.Response:
        """The owner of ``?key=K``, decided by the data plane's own function on the same bytes
        a client would send in the key header (percent-decoded, nothing else done to them)."""
        values = query_values(request.rel_url.raw_query_string, b"key")
        if not values:
            return _error(400, MISSING_KEY.code, "give the key as ?key=K")
        if len(values) > 1:
            return _error(400, REPEATED_KEY.code, "give the key once")
        topology = self._holder.current
        if topology is None:
            return _error(503, "not_ready", "no shard config is loaded yet")
        found = owner_group(topology, values[0])
        if isinstance(found, Refusal):
            return _error(found.status, found.code, found.detail)
        group = found
        return _json(
            {
                "key": values[0].strip(b" \t").decode("utf-8"),
                "group": group.name,
                "epoch": topology.epoch,
                "ready_pods": [pod.address for pod in group.ready],
            }
        )


def query_values(raw_query: str, name: bytes) -> list[bytes]:
    """Every value of ``name`` in a raw query string, percent-decoded to bytes ("+" is a
    space, as in forms): not decoded as text, so invalid UTF-8 stays visible to validation."""
    values = []
    for part in raw_query.encode("utf-8", "surrogateescape").split(b"&"):
        key, _, value = part.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) == name:
            values.append(unquote_to_bytes(value.replace(b"+", b" ")))
    return values


class AdminServer:
    """The admin app bound to its own socket (port 0 allowed: ``address`` says what was bound)."""

    def __init__(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self._runner = runner
        self.address = address

    @classmethod
    async def start(cls, admin: AdminApp, listen: tuple[str, int]) -> AdminServer:
        runner = web.AppRunner(admin.app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.create_server(listen, reuse_port=False)
        await web.SockSite(runner, sock).start()
        return cls(runner, sock.getsockname()[:2])

    async def stop(self) -> None:
        await self._runner.cleanup()
