"""Harness for the lifecycle tests: real gateway processes, real signals, real sockets.

What is here (the gateway helpers of ``tests/integration`` and ``tests/k8s`` are reused as they
are; their fixtures are re-declared thinly below, since a conftest's fixtures are only visible
under its own directory):

- ``RawUpstream``: a tiny HTTP/1.1 server written on a raw ``asyncio.Protocol`` so that its
  keep-alive behaviour is exact: it can close a connection a fixed time after its last
  response (as many servers do), stream a response slowly, and hold requests until the test
  opens a named gate. Every request is recorded at arrival.
- ``GatedPodFarm``: the k8s ``PodFarm`` (pods on 127.0.0.N, one port) with a per-gate held
  endpoint ``/gated?gate=NAME``, and a record of held requests at arrival.
- ``TrackedConn``: a raw client connection that knows whether any response byte arrived and
  whether the peer closed it while it sat idle (the check urllib3 makes before reusing one).
- ``ServiceClient``: what a client behind a Kubernetes Service sees of several gateway
  replicas: an "endpoints controller" thread polls each replica's ``/readyz``; new connections
  go (round robin) to ready replicas only; open keep-alive connections stay where they are
  until the server closes them.
- process helpers: is a pid gone, how many client connections a process holds.

Everything waits by polling with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import select
import socket
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp import web

from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.integration.upstream import IncompleteResponse, RawConn, RawResponse, build_request
from tests.k8s.apiserver import FakeApiServer
from tests.k8s.conftest import GatewayFactory as KubeGatewayFactory
from tests.k8s.pods import KEY_HEADER, Hit, PodFarm
from tests.support import LoopThread, close_and_report, wait_until

DEADLINE = 10.0  # generous: the machine is often loaded by other test runs


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or the deadline passes; the last result."""
    return wait_until(predicate, timeout, interval)


# ---------------------------------------------------------------------------------------------
# A raw upstream with exact keep-alive behaviour


@dataclass(frozen=True)
class UpstreamHit:
    pod: str
    group: str
    conn: int  # connection number on this server (1, 2, ...)
    method: str
    path: str
    key: str | None
    shard_group: str | None  # X-Shard-Group as received from the gateway
    request_id: str | None
    at: float  # time.monotonic() at arrival (head and body read)


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names (last value wins: enough here)
    body: bytes


def _parse_request(buf: bytearray) -> _Request | None:
    """One complete request from the front of ``buf`` (consumed), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not used by these tests")
    length = int(headers.get("content-length", "0"))
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    split = urlsplit(target)
    return _Request(method, target, split.path, dict(parse_qsl(split.query)), headers, body)


class _UpstreamConnection(asyncio.Protocol):
    """One server connection: requests are answered one at a time, in order."""

    def __init__(self, server: RawUpstream, number: int) -> None:
        self.server = server
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm_idle()
        self.server._connections.discard(self)

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        # I/O callbacks run before due timers in an asyncio loop iteration: a request that
        # arrived before the idle timer's iteration cancels the close.
        self._disarm_idle()
        self.buf += data
        if not self.busy:
            self._next()

    def _arm_idle(self) -> None:
        idle = self.server.idle_close
        if idle is not None and not self.closed:
            self.idle_timer = asyncio.get_running_loop().call_later(idle, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if not self.busy and not self.buf and self.transport is not None:
            self.server._count_idle_close()
            self.transport.close()

    def _next(self) -> None:
        try:
            request = _parse_request(self.buf)
        except ValueError:
            if self.transport is not None:
                self.transport.close()
            return
        if request is None:
            if not self.buf:
                self._arm_idle()
            return
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: _Request) -> None:
        transport = self.transport
        assert transport is not None
        keep_alive = await self.server._respond(self, request, transport)
        self.busy = False
        if self.closed:
            return
        if not keep_alive:
            transport.close()
            return
        self._next()


class RawUpstream:
    """A test pod on 127.0.0.1:<port>, on its own event loop thread.

    Paths: ``/stream?chunks=N&interval=S`` answers chunked, one chunk every ``S`` seconds
    (``&gate=NAME``: the last chunk and the end of the body only once ``release(NAME)`` was called);
    ``/hold?gate=NAME`` is answered once ``release(NAME)`` was called; anything else gets a JSON
    echo ``{"pod", "group", "shard_group", "key", "request_id", "conn"}``. ``idle_close``: close a
    keep-alive connection that many seconds after its last response (or after connecting).
    """

    def __init__(self, group: str, pod: str, *, idle_close: float | None = None) -> None:
        self.group = group
        self.pod = pod
        self.idle_close = idle_close
        self.port = 0
        self._lock = threading.Lock()
        self._hits: list[UpstreamHit] = []
        self._numbers = itertools.count(1)
        self.connections_opened = 0
        self.idle_closed = 0
        self._connections: set[_UpstreamConnection] = set()
        self._gates: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> RawUpstream:
        loop_thread = LoopThread(self._startup, name=f"up-{self.pod}")
        self._loop, self._thread = loop_thread.loop, loop_thread.thread
        loop_thread.start(15)
        return self

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, "127.0.0.1", 0, backlog=512)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _new_connection(self) -> _UpstreamConnection:
        with self._lock:
            self.connections_opened += 1
        return _UpstreamConnection(self, next(self._numbers))

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.abort()
                if conn.task is not None:
                    conn.task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    # -- what was received, gates ---------------------------------------------------------------

    def hits(self, predicate: Callable[[UpstreamHit], bool] = lambda h: True) -> list[UpstreamHit]:
        with self._lock:
            return [h for h in self._hits if predicate(h)]

    def open_connections(self) -> int:
        """Connections open right now, as this server sees them (counted on its own loop)."""
        loop = self._loop
        assert loop is not None, "upstream not started"

        async def count() -> int:
            return sum(1 for conn in self._connections if not conn.closed)

        return asyncio.run_coroutine_threadsafe(count(), loop).result(10)

    def _count_idle_close(self) -> None:
        with self._lock:
            self.idle_closed += 1

    def _gate(self, name: str) -> asyncio.Event:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Event()
        return gate

    def release(self, name: str) -> None:
        """Answer every ``/hold?gate=NAME`` request, now and later."""
        loop = self._loop
        assert loop is not None, "upstream not started"
        loop.call_soon_threadsafe(lambda: self._gate(name).set())

    # -- serving --------------------------------------------------------------------------------

    async def _respond(self, conn: _UpstreamConnection, req: _Request, transport: asyncio.Transport) -> bool:
        hit = UpstreamHit(
            pod=self.pod,
            group=self.group,
            conn=conn.number,
            method=req.method,
            path=req.path,
            key=req.headers.get(KEY_HEADER.lower()),
            shard_group=req.headers.get("x-shard-group"),
            request_id=req.headers.get("x-request-id"),
            at=time.monotonic(),
        )
        with self._lock:
            self._hits.append(hit)
        keep_alive = "close" not in req.headers.get("connection", "").lower()
        tail = b"" if keep_alive else b"Connection: close\r\n"
        if req.path == "/stream":
            chunks, interval = int(req.query.get("chunks", "10")), float(req.query.get("interval", "0.5"))
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                + tail
                + b"\r\n"
            )
            gate = req.query.get("gate")
            for i in range(chunks):
                await asyncio.sleep(interval)  # the behaviour under test: a slow stream
                if gate is not None and i == chunks - 1:
                    await self._gate(gate).wait()  # the last chunk and the end wait for the test
                if conn.closed:
                    return False
                piece = b"chunk %d of %d\n" % (i + 1, chunks)
                transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            transport.write(b"0\r\n\r\n")
            return keep_alive
        if req.path == "/hold":
            await self._gate(req.query.get("gate", "")).wait()
            if conn.closed:
                return False
        body = json.dumps(
            {
                "pod": self.pod,
                "group": self.group,
                "shard_group": hit.shard_group,
                "key": hit.key,
                "request_id": hit.request_id,
                "conn": conn.number,
            }
        ).encode()
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), tail, body)
        )
        return keep_alive


class UpstreamSet:
    """Starts ``RawUpstream`` servers and stops them all at teardown."""

    def __init__(self) -> None:
        self.servers: list[RawUpstream] = []

    def __call__(self, group: str, pod: str, *, idle_close: float | None = None) -> RawUpstream:
        server = RawUpstream(group, pod, idle_close=idle_close).start()
        self.servers.append(server)
        return server

    def hits(self, predicate: Callable[[UpstreamHit], bool] = lambda h: True) -> list[UpstreamHit]:
        return [h for s in self.servers for h in s.hits(predicate)]

    def close(self) -> None:
        for server in self.servers:
            server.stop()


# ---------------------------------------------------------------------------------------------
# Pods on loopback addresses with held requests per gate


class GatedPodFarm(PodFarm):
    """``PodFarm`` plus ``/gated?gate=NAME``: recorded at arrival (``held(NAME)``), answered once
    ``open_gate(NAME)`` was called (and then recorded as a normal hit too)."""

    def __init__(self, count: int, first_octet: int = 2) -> None:
        super().__init__(count, first_octet)
        self._gates: dict[str, asyncio.Event] = {}
        self._held: list[tuple[str, Hit]] = []
        self._answered: dict[str, int] = {}

    def _gate_named(self, name: str) -> asyncio.Event:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Event()
        return gate

    def open_gate(self, name: str) -> None:
        loop = self._loop
        assert loop is not None, "farm not started"
        loop.call_soon_threadsafe(lambda: self._gate_named(name).set())

    def held(self, gate: str) -> list[Hit]:
        """Requests that arrived for ``gate`` (answered or not)."""
        with self._lock:
            return [h for g, h in self._held if g == gate]

    def answered(self, gate: str) -> int:
        with self._lock:
            return self._answered.get(gate, 0)

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path != "/gated":
            return await super()._handle(request)
        name = request.query.get("gate", "")
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        hit = Hit(
            pod=f"{sockname[0]}:{sockname[1]}" if sockname else "?",
            method=request.method,
            path=request.path,
            key=request.headers.get(KEY_HEADER),
            shard_group=request.headers.get("X-Shard-Group"),
            epoch=request.headers.get("X-Shard-Epoch"),
            at=time.monotonic(),
        )
        with self._lock:
            self._held.append((name, hit))
        await self._gate_named(name).wait()
        response = await super()._handle(request)
        with self._lock:
            self._answered[name] = self._answered.get(name, 0) + 1
        return response


# ---------------------------------------------------------------------------------------------
# Raw client connections


class ConnectionFailed(Exception):
    """A request got no complete response. ``got_bytes``: some response byte had arrived."""

    def __init__(self, message: str, got_bytes: bool, reset: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes
        self.reset = reset


class TrackedConn(RawConn):
    """``RawConn`` that counts received bytes and notes a reset (RawConn reads a reset as EOF)."""

    def __init__(self, port: int, *, timeout: float = 15.0) -> None:
        super().__init__(port, timeout=timeout)
        self.port = port
        self.received = 0
        self.reset = False
        self.requests = 0

    def __enter__(self) -> TrackedConn:
        return self

    def _fill(self, max_bytes: int = 65536) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(max_bytes)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            return False
        self.received += len(data)
        self.buf += data
        return True

    def peer_closed(self) -> bool:
        """Whether the idle connection has something to read: for an idle client, a close.

        The check every keep-alive client makes before reusing a pooled connection.
        """
        if self.eof or self.buf:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        request_id: str | None = None,
        body: bytes | None = None,
    ) -> RawResponse:
        headers: list[tuple[str, str]] = []
        if key is not None:
            headers.append((KEY_HEADER, key))
        if request_id is not None:
            headers.append(("X-Request-ID", request_id))
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b'{"item": 1}'
        before = self.received
        self.requests += 1
        try:
            self.send(build_request(method, path, headers, body))
            return self.read_response(method)
        except (OSError, IncompleteResponse) as exc:
            raise ConnectionFailed(
                f"{type(exc).__name__}: {exc}", got_bytes=self.received > before, reset=self.reset
            ) from exc


def one_request(
    port: int, method: str, path: str, key: str | None = None, request_id: str | None = None
) -> RawResponse:
    """One request on a fresh connection (closed afterwards)."""
    with TrackedConn(port) as conn:
        return conn.request(method, path, key, request_id)


def connect_refused(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:``port`` is refused (nobody listening)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def readyz(admin_port: int) -> int:
    """/readyz status; -1 when the admin server does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", admin_port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                piece = sock.recv(4096)
                if not piece:
                    break
                data += piece
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else -1
    except (OSError, ValueError, IndexError):
        return -1


class Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str = "background") -> None:
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._future.set_result(fn())
        except BaseException as exc:
            self._future.set_exception(exc)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float = DEADLINE) -> Any:
        return self._future.result(timeout)


# ---------------------------------------------------------------------------------------------
# A client behind a Kubernetes Service in front of several gateway replicas


@dataclass(frozen=True)
class Outcome:
    request_id: str
    method: str
    key: str
    port: int  # the gateway replica the connection went to
    reused: bool  # sent on a kept-alive connection that had carried a request before
    started: float
    ended: float
    status: int  # -1: no complete response
    error: str | None = None
    got_bytes: bool = False  # some response byte arrived (for a failure)
    reset: bool = False
    connection_close: bool = False  # the response said Connection: close
    group: str | None = None  # X-Shard-Group of the response
    served_by: str | None = None  # the upstream pod, from its echo
    retry_of: str | None = None  # the request id this one repeats (after an unaccepted failure)
    picked: float = 0.0  # when the client chose ``port`` for this request's connection


@dataclass
class ServiceClient:
    """Clients behind a Service: new connections go round robin to replicas whose /readyz is 200.

    ``replicas`` maps data port -> admin port. ``threads`` load threads each keep one connection
    alive until the server closes it (``Connection: close`` or EOF), and check it for a close
    notice before reusing it (as keep-alive clients do). A request that fails on a reused
    connection without a single response byte is handed to ``unaccepted``; if that says the
    gateway never took the request, it is sent again once on a new connection (the retry any
    HTTP client makes on a kept-alive connection the server had closed).
    """

    replicas: dict[int, int]
    keys: Sequence[str]
    unaccepted: Callable[[Outcome], bool]
    threads: int = 2
    outcomes: list[Outcome] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    stale_reconnects: int = 0
    # When the endpoints controller first dropped a replica from ``ready``: a connection picked
    # later cannot go to it (both times are taken under the same lock as the pick).
    unready_at: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.ready = list(self.replicas)
        self._workers = [
            threading.Thread(target=self._load, args=(i,), name=f"service-client-{i}", daemon=True)
            for i in range(self.threads)
        ]
        self._controller = threading.Thread(target=self._watch_readiness, name="endpoints", daemon=True)

    def __enter__(self) -> ServiceClient:
        self._controller.start()
        for worker in self._workers:
            worker.start()
        assert self.progress(20), "the service client did not get going"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in [*self._workers, self._controller]:
            thread.join(20)
            assert not thread.is_alive(), f"{thread.name} stuck"
        with self._lock:
            return list(self.outcomes)

    def progress(self, requests: int, timeout: float = DEADLINE) -> bool:
        """Wait until ``requests`` more requests have completed."""
        with self._progress:
            target = len(self.outcomes) + requests
            return self._progress.wait_for(lambda: len(self.outcomes) >= target, timeout)

    # -- the endpoints controller -------------------------------------------------------------

    def _watch_readiness(self) -> None:
        while not self._stop.is_set():
            ready = [port for port, admin in self.replicas.items() if readyz(admin) == 200]
            with self._lock:
                now = time.monotonic()
                for port in self.ready:
                    if port not in ready:
                        self.unready_at.setdefault(port, now)
                self.ready = ready
            self._stop.wait(0.02)

    def _pick(self) -> tuple[int | None, float]:
        """A ready replica for a new connection (None: none is ready), and when it was picked."""
        with self._lock:
            ready = list(self.ready)
            picked = time.monotonic()
        return (ready[next(self._rr) % len(ready)] if ready else None), picked

    # -- load ---------------------------------------------------------------------------------------

    def _record(self, outcome: Outcome) -> None:
        with self._progress:
            self.outcomes.append(outcome)
            self._progress.notify_all()

    def _load(self, index: int) -> None:
        conn: TrackedConn | None = None
        picked = 0.0
        i = index
        retry: tuple[str, str, str] | None = None  # (method, key, original id)
        while not self._stop.is_set():
            if retry is not None:
                method, key, retry_of = retry
            else:
                method, key, retry_of = ("POST" if i % 2 == 0 else "GET"), self.keys[i % len(self.keys)], None
                i += self.threads
            if conn is not None and conn.peer_closed():
                conn.close()
                conn = None
                with self._lock:
                    self.stale_reconnects += 1
            if conn is None:
                port, picked = self._pick()
                if port is None:
                    self._stop.wait(0.01)  # no ready replica at the moment: wait for one
                    continue
                try:
                    conn = TrackedConn(port)
                except OSError as exc:
                    now = time.monotonic()
                    rid = f"c{index}-{next(self._ids)}"
                    self._record(
                        Outcome(rid, method, key, port, False, now, now, -1, f"connect: {exc}", picked=picked)
                    )
                    retry = None
                    continue
            rid = f"c{index}-{next(self._ids)}"
            reused = conn.requests > 0
            started = time.monotonic()
            try:
                resp = conn.request(method, "/orders", key, rid)
            except ConnectionFailed as exc:
                outcome = Outcome(
                    rid, method, key, conn.port, reused, started, time.monotonic(), -1, str(exc),
                    exc.got_bytes, exc.reset, retry_of=retry_of, picked=picked,
                )  # fmt: skip
                conn.close()
                conn = None
                self._record(outcome)
                retry = (method, key, rid) if retry_of is None and self.unaccepted(outcome) else None
                continue
            doc: Any = None
            with contextlib.suppress(ValueError):
                doc = json.loads(resp.body)
            self._record(
                Outcome(
                    rid, method, key, conn.port, reused, started, time.monotonic(), resp.status,
                    connection_close=resp.closes, group=resp.header("X-Shard-Group"),
                    served_by=doc.get("pod") if isinstance(doc, dict) else None, retry_of=retry_of,
                    picked=picked,
                )
            )  # fmt: skip
            retry = None
            if resp.closes:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Processes


def pid_gone(pid: int) -> bool:
    """The process has exited: no such pid, or only its zombie entry is left.

    Every thread counts: the zombie entry of a multi-threaded process shows while its other
    threads are still exiting, and they hold its files (its listening socket) until the last
    one is done.
    """
    try:
        tasks = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return True
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return False
    return True


def pipe_pending(fd: int) -> int:
    """Bytes written into a pipe (either end's fd) and not read yet."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


def established_on(pid: int, port: int, peers: set[int]) -> int:
    """How many established TCP connections on local ``port`` from one of the local client
    ports ``peers`` process ``pid`` holds (others' connections never count)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                local_port = int(parts[1].rsplit(":", 1)[1], 16)
                remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                if local_port == port and remote_port in peers and parts[3] == "01" and parts[9] in inodes:
                    count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def upstreams() -> Iterator[UpstreamSet]:
    servers = UpstreamSet()
    yield servers
    servers.close()


@pytest.fixture
def static_gateways(tmp_path: Path) -> Iterator[StaticGatewayFactory]:
    """Gateways on a static config file (tests/integration's factory)."""
    factory = StaticGatewayFactory(tmp_path)
    yield factory
    close_and_report(factory)


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def pod_farm() -> Iterator[GatedPodFarm]:
    farm = GatedPodFarm(8)
    with farm:
        yield farm


@pytest.fixture
def kube_gateways(api_server: FakeApiServer, tmp_path: Path) -> Iterator[KubeGatewayFactory]:
    """Gateways run with ``--configmap`` against the API-server double (tests/k8s's factory)."""
    factory = KubeGatewayFactory(api_server, tmp_path)
    yield factory
    close_and_report(factory)
