"""Test "pods": real HTTP servers on distinct loopback addresses that share one port.

In a cluster every pod of a Service listens on the same container port at its own pod IP, and
the EndpointSlices list those IPs. ``PodFarm`` does the same on one machine: it binds
``127.0.0.2:P``, ``127.0.0.3:P``, ... (the whole 127/8 block is loopback on Linux) with one
port ``P`` for all of them, and serves every address from one aiohttp application on one event
loop thread.

Every request is recorded (``Hit``: which address served it, method, path, shard key, and the
``X-Shard-Group``/``X-Shard-Epoch`` headers the gateway sent) and answered with a JSON echo of
the same, so a client can tell which pod served it without asking the farm. A request for
``/hold`` is recorded at once but answered only after ``release()``: a request kept in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from tests.support import LoopThread

KEY_HEADER = "User-ID"


@dataclass(frozen=True)
class Hit:
    pod: str  # "127.0.0.N:P": the address that accepted the connection
    method: str
    path: str
    key: str | None
    shard_group: str | None  # X-Shard-Group as received from the gateway
    epoch: str | None  # X-Shard-Epoch as received
    at: float  # time.monotonic() when the handler ran


def _bind_all(hosts: list[str], attempts: int = 50) -> tuple[int, list[socket.socket]]:
    """Listening sockets on every host with one common port (retried if a host has it taken)."""
    for _ in range(attempts):
        sockets: list[socket.socket] = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sockets.append(first)
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            for host in hosts[1:]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                sockets.append(sock)
                sock.bind((host, port))
            for sock in sockets:
                sock.listen(256)
                sock.setblocking(False)
            return port, sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError(f"no common free port on {hosts[0]}..{hosts[-1]} after {attempts} attempts")


class PodFarm:
    """``count`` pods at 127.0.0.2 .. 127.0.0.(count+1), all on ``self.port``."""

    def __init__(self, count: int, first_octet: int = 2) -> None:
        if not 1 <= count <= 250 - first_octet:
            raise ValueError("count out of range")
        self.hosts = [f"127.0.0.{first_octet + i}" for i in range(count)]
        self.port = 0
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sites: dict[str, web.SockSite] = {}
        self._gate: asyncio.Event | None = None  # /hold requests wait for it

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> PodFarm:
        loop_thread = LoopThread(self._startup, name="pod-farm")
        self._loop, self._thread = loop_thread.loop, loop_thread.thread
        loop_thread.start(15)
        return self

    async def _startup(self) -> None:
        self.port, sockets = _bind_all(self.hosts)
        self._gate = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        for host, sock in zip(self.hosts, sockets, strict=True):
            site = web.SockSite(self._runner, sock)
            await site.start()
            self._sites[self.address(host)] = site

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    def __enter__(self) -> PodFarm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(h) for h in self.hosts]

    def release(self) -> None:
        """Let every held (``/hold``) request, now and later, be answered."""
        loop, gate = self._loop, self._gate
        assert loop is not None and gate is not None, "farm not started"
        loop.call_soon_threadsafe(gate.set)

    # -- what was served ------------------------------------------------------------------------

    def hits(self, predicate: Callable[[Hit], bool] = lambda h: True) -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if predicate(h)]

    def count(self, pod: str) -> int:
        """Requests served so far by the pod at address ``pod`` ("127.0.0.N:P")."""
        with self._lock:
            return sum(1 for h in self._hits if h.pod == pod)

    def total(self) -> int:
        with self._lock:
            return len(self._hits)

    # -- serving --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        pod = f"{sockname[0]}:{sockname[1]}" if sockname else "?"
        await request.read()
        hit = Hit(
            pod=pod,
            method=request.method,
            path=request.path,
            key=request.headers.get(KEY_HEADER),
            shard_group=request.headers.get("X-Shard-Group"),
            epoch=request.headers.get("X-Shard-Epoch"),
            at=time.monotonic(),
        )
        with self._lock:
            self._hits.append(hit)
        if request.path == "/hold" and self._gate is not None:
            await self._gate.wait()
        return web.json_response(
            {"pod": pod, "shard_group": hit.shard_group, "epoch": hit.epoch, "key": hit.key}
        )
