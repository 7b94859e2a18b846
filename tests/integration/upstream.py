"""Real test upstreams ("pods") and raw HTTP/1.1 client helpers for the integration tests.

``UpstreamServer`` is a hand-written HTTP/1.1 server over asyncio streams, run on its own event
loop in a background thread and bound to 127.0.0.1 port 0. Parsing and framing are done by hand
so that every byte on the wire is under the test's control. Each server knows its group and pod
name, records every complete request it receives (``RecordedRequest``) and answers per path:

=====================================  ==========================================================
``/<anything>`` (default)              200, JSON echo of what was received (``echo_json``)
``/chunked?chunks=N&size=M``           chunked response: N chunks of M bytes (``pattern``)
``/big?size=N``                        N bytes with Content-Length, written in 64 KiB pieces
                                       respecting ``drain()`` (``pattern(N)``)
``/status/NNN``                        that status; 204 and 304 carry no body (304 carries a
                                       Content-Length and an ETag, as RFC 9110 allows)
``/head``                              GET: fixed body ``HEAD_BODY``; HEAD: same headers, no body
``/slow-headers?delay=S``              waits S seconds before answering (echo)
``/close``                             echo with ``Connection: close``, then closes;
                                       ``?framing=eof``: no Content-Length, body ends at close
``/reset``                             closes the connection without a response (RST)
``/continue``                          echo; the 100-continue handling applies to every path
``/upload?slow=1``                     reads the body in small pieces, slowly; echo
``/truncate?size=N&send=M``            announces N bytes, sends M, closes (``&chunked=1``:
                                       sends chunks, closes without the last chunk)
``/hop``                               echo, plus hop-by-hop response headers
``/garbage``                           answers with bytes that are not HTTP, then closes
``/early``                             403 from the head alone (body never read), then closes
=====================================  ==========================================================

Any request with ``Expect: 100-continue`` gets ``100 Continue`` before the body is read.
Every non-error response carries ``X-Upstream-Pod``, ``X-Upstream-Group`` and ``X-Upstream-Conn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

HEAD_BODY = b"head-body: exactly these bytes, served for GET /head\n"
KEEP_BODY_MAX = 1 << 20  # request bodies up to this size are kept in memory for assertions
_PIECE = 64 * 1024


@functools.lru_cache(maxsize=8)
def pattern(size: int) -> bytes:
    """Deterministic, non-periodic bytes of ``size`` length (reordering or loss changes sha256)."""
    return random.Random(size).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or the deadline passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Recorded requests


class HeaderLookup:
    """``header``/``header_all`` over ``headers`` ((name, value) pairs, in wire order), and
    ``json`` of ``body``: shared by recorded requests and the responses the tests read."""

    headers: list[tuple[str, str]]
    body: bytes | None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)


@dataclass(frozen=True)
class RecordedRequest(HeaderLookup):
    pod: str
    group: str
    conn_id: str
    seq: int  # 0-based index of the request on its connection
    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: list[tuple[str, str]]  # in wire order and case; values decoded as latin-1 (lossless)
    body_length: int
    body_sha256: str
    body: bytes | None  # kept when <= KEEP_BODY_MAX
    chunked: bool
    expect_continue: bool
    received_at: float

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def echo_json(req: RecordedRequest) -> dict[str, Any]:
    return {
        "pod": req.pod,
        "group": req.group,
        "conn_id": req.conn_id,
        "seq": req.seq,
        "method": req.method,
        "target": req.target,
        "headers": [[k, v] for k, v in req.headers],
        "body_length": req.body_length,
        "body_sha256": req.body_sha256,
        "chunked": req.chunked,
        "expect_continue": req.expect_continue,
    }


class _BadRequest(Exception):
    pass


class _Incomplete(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The server


class UpstreamServer:
    """One test pod: an HTTP/1.1 server on its own event loop thread."""

    def __init__(
        self,
        group: str,
        pod: str,
        *,
        rcvbuf: int | None = None,
        stream_limit: int = 1 << 20,
        idle_close: float | None = None,
    ) -> None:
        """``rcvbuf`` fixes the kernel receive buffer (no autotuning up to tcp_rmem's 32 MiB), and
        ``stream_limit`` bounds what asyncio buffers: together they make a slow reader push back."""
        self.group = group
        self.pod = pod
        self.port = 0
        self._rcvbuf = rcvbuf
        self._stream_limit = stream_limit
        self._idle_close = idle_close  # close keep-alive connections idle this long (seconds)
        self.idle_closed = 0
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._incomplete: list[tuple[str, str]] = []  # (conn_id, target) of requests cut short
        self._conn_counter = itertools.count(1)
        self.connections_opened = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> UpstreamServer:
        self._thread = threading.Thread(target=self._run, name=f"upstream-{self.pod}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"upstream {self.pod} did not start")
        if self._error is not None:
            raise RuntimeError(f"upstream {self.pod} failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on sockets that say they are TCP;
            # without it, a head and a body written separately meet Nagle + delayed ACK (40 ms).
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
            self.port = sock.getsockname()[1]
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_connection, sock=sock, limit=self._stream_limit)
            )
        except BaseException as exc:  # pragma: no cover - reported by start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(10)

    # -- what was received ----------------------------------------------------------------------

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def incomplete(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._incomplete)

    def conn_ids(self, predicate: Callable[[RecordedRequest], bool] = lambda r: True) -> set[str]:
        return {r.conn_id for r in self.requests() if predicate(r)}

    # -- connection handling --------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn_id = f"{self.pod}/c{next(self._conn_counter)}"
        with self._lock:
            self.connections_opened += 1
        try:
            for seq in itertools.count():
                keep_open = await self._one_request(reader, writer, conn_id, seq)
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, _BadRequest, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: str, seq: int
    ) -> bool:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._idle_close)
        except asyncio.IncompleteReadError:
            return False
        except TimeoutError:
            with self._lock:
                self.idle_closed += 1
            return False
        lines = head[:-4].split(b"\r\n")
        try:
            method_b, target_b, version_b = lines[0].split(b" ", 2)
        except ValueError:
            raise _BadRequest(lines[0]) from None
        method = method_b.decode("latin-1")
        target = target_b.decode("latin-1")
        version = version_b.decode("latin-1")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadRequest(line)
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        lower: dict[str, list[str]] = {}
        for k, v in headers:
            lower.setdefault(k.lower(), []).append(v)
        split = urlsplit(target)
        path = split.path
        query = dict(parse_qsl(split.query))
        chunked = "chunked" in ",".join(lower.get("transfer-encoding", [])).lower()
        expect = any(v.lower() == "100-continue" for v in lower.get("expect", []))
        content_length = int(lower["content-length"][0]) if "content-length" in lower else 0
        has_body = chunked or content_length > 0

        if path == "/early":
            # Answer from the head alone, without reading the body, then close (an upstream that
            # rejects an upload early).
            req = RecordedRequest(
                self.pod, self.group, conn_id, seq, method, target, path, query, version, headers,
                0, sha256(b""), None, chunked, expect, time.monotonic(),
            )  # fmt: skip
            with self._lock:
                self._requests.append(req)
            rejection = b'{"error": "rejected early"}'
            headers_out = [
                *self._base_headers(req),
                ("Content-Length", str(len(rejection))),
                ("Connection", "close"),
            ]
            writer.write(self._head(403, "Forbidden", headers_out) + rejection)
            await writer.drain()
            writer.close()
            return False

        if expect and has_body:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

        slow = path == "/upload" and query.get("slow") == "1"
        try:
            length, digest, body = await self._read_body(reader, chunked, content_length, slow)
        except (asyncio.IncompleteReadError, ConnectionError, _Incomplete):
            with self._lock:
                self._incomplete.append((conn_id, target))
            return False

        req = RecordedRequest(
            pod=self.pod,
            group=self.group,
            conn_id=conn_id,
            seq=seq,
            method=method,
            target=target,
            path=path,
            query=query,
            version=version,
            headers=headers,
            body_length=length,
            body_sha256=digest,
            body=body,
            chunked=chunked,
            expect_continue=expect,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(req)
        client_close = any("close" in v.lower() for v in lower.get("connection", []))
        keep_open = await self._respond(req, writer)
        return keep_open and not client_close

    async def _read_body(
        self, reader: asyncio.StreamReader, chunked: bool, content_length: int, slow: bool
    ) -> tuple[int, str, bytes | None]:
        hasher = hashlib.sha256()
        kept: bytearray | None = bytearray()
        total = 0

        def take(data: bytes) -> None:
            nonlocal total, kept
            total += len(data)
            hasher.update(data)
            if kept is not None:
                if total > KEEP_BODY_MAX:
                    kept = None
                else:
                    kept += data

        async def read_exact(n: int) -> None:
            while n > 0:
                if slow:
                    piece = await reader.read(min(n, 16 * 1024))
                    await asyncio.sleep(0.001)
                else:
                    piece = await reader.read(min(n, _PIECE))
                if not piece:
                    raise _Incomplete()
                take(piece)
                n -= len(piece)

        if chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size_text = size_line[:-2].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _BadRequest(size_line) from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailer fields
                    break
                await read_exact(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise _BadRequest(b"chunk without CRLF")
        else:
            await read_exact(content_length)
        return total, hasher.hexdigest(), (bytes(kept) if kept is not None else None)

    # -- responses ------------------------------------------------------------------------------

    def _base_headers(self, req: RecordedRequest) -> list[tuple[str, str]]:
        return [
            ("X-Upstream-Pod", self.pod),
            ("X-Upstream-Group", self.group),
            ("X-Upstream-Conn", req.conn_id),
        ]

    @staticmethod
    def _head(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send_body(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), _PIECE):
            writer.write(view[start : start + _PIECE])
            await writer.drain()

    async def _respond(self, req: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        path, query, head_only = req.path, req.query, req.method == "HEAD"
        base = self._base_headers(req)

        if path == "/reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False

        if path == "/garbage":
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            await writer.drain()
            writer.close()
            return False

        if path == "/slow-headers":
            await asyncio.sleep(float(query.get("delay", "1")))

        if path == "/chunked":
            chunks, size = int(query.get("chunks", "8")), int(query.get("size", "1000"))
            body = pattern(chunks * size)
            writer.write(
                self._head(
                    200,
                    "OK",
                    [*base, ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
                )
            )
            if not head_only:
                for i in range(chunks):
                    piece = body[i * size : (i + 1) * size]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True

        if path == "/big":
            size = int(query.get("size", "0"))
            writer.write(
                self._head(
                    200,
                    "OK",
                    [*base, ("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
                )
            )
            await writer.drain()
            if not head_only:
                await self._send_body(writer, pattern(size))
            return True

        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if status in (204, 304):
                extra = [("ETag", '"v1"'), ("Content-Length", "1234")] if status == 304 else []
                writer.write(self._head(status, "No Body", [*base, *extra]))
                await writer.drain()
                return True
            body = json.dumps({"status": status, "pod": self.pod}).encode()
            writer.write(
                self._head(
                    status,
                    "Status",
                    [*base, ("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
            )
            if not head_only:
                writer.write(body)
            await writer.drain()
            return True

        if path == "/head":
            writer.write(
                self._head(
                    200,
                    "OK",
                    [*base, ("Content-Type", "text/plain"), ("Content-Length", str(len(HEAD_BODY)))],
                )
            )
            if not head_only:
                writer.write(HEAD_BODY)
            await writer.drain()
            return True

        if path == "/truncate":
            size, send = int(query.get("size", "100000")), int(query.get("send", "5000"))
            body = pattern(size)
            if query.get("chunked") == "1":
                writer.write(self._head(200, "OK", [*base, ("Transfer-Encoding", "chunked")]))
                writer.write(b"%x\r\n%s\r\n" % (send, body[:send]))
            else:
                writer.write(self._head(200, "OK", [*base, ("Content-Length", str(size))]))
                writer.write(body[:send])
            await writer.drain()
            await asyncio.sleep(float(query.get("stall", "0")))  # silent, connection open
            writer.close()
            return False

        body = json.dumps(echo_json(req)).encode()
        headers = [*base, ("Content-Type", "application/json")]
        if path == "/hop":
            headers += [
                ("Connection", "keep-alive, X-Hop-Resp"),
                ("X-Hop-Resp", "must-not-reach-client"),
                ("Keep-Alive", "timeout=30"),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("X-End-To-End", "kept"),
            ]
        if path == "/close":
            if query.get("framing") == "eof":
                writer.write(self._head(200, "OK", [*headers, ("Connection", "close")]))
            else:
                writer.write(
                    self._head(
                        200, "OK", [*headers, ("Connection", "close"), ("Content-Length", str(len(body)))]
                    )
                )
            if not head_only:
                writer.write(body)
            await writer.drain()
            writer.close()
            return False
        writer.write(self._head(200, "OK", [*headers, ("Content-Length", str(len(body)))]))
        if not head_only:
            writer.write(body)
        await writer.drain()
        return True


def start_upstreams(group: str, count: int, prefix: str | None = None, **kwargs: Any) -> list[UpstreamServer]:
    return [
        UpstreamServer(group, f"{prefix or group}-pod-{i}", **kwargs).start() for i in range(1, count + 1)
    ]


class DeadPort:
    """A port that refuses connections: bound (so nobody else takes it) but never listening."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


class BlackholePort:
    """A port where a TCP handshake never completes (a pod whose SYNs go unanswered).

    It listens with a backlog of 0 and its accept queue is filled by connections that are never
    accepted; Linux then drops further SYNs (``ListenOverflows``) instead of refusing them, so a
    client's connect neither succeeds nor fails until its own timeout. Filled until a probe's
    handshake does not complete.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        self.port: int = self._sock.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(8):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.setblocking(False)
            probe.connect_ex(("127.0.0.1", self.port))
            # A loopback handshake completes in the kernel, without waiting on any process.
            _, writable, _ = select.select([], [probe], [], 0.3)
            if writable and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                self._fillers.append(probe)  # queued, never accepted
                continue
            probe.close()
            if self._fillers:
                return
            break
        self.close()
        raise RuntimeError("could not fill the accept queue of a backlog-0 listener")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()
        self._sock.close()


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1 client helpers


class IncompleteResponse(Exception):
    """The connection ended before a complete response was read."""

    def __init__(self, message: str, partial: RawResponse | None = None) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass
class RawResponse(HeaderLookup):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    informational: list[int] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def closes(self) -> bool:
        return any("close" in v.lower() for v in self.header_all("Connection"))


class RawConn:
    """A client socket with a read buffer; reads are bounded by ``timeout`` each."""

    def __init__(self, port: int, *, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, max_bytes: int = 65536) -> bool:
        """Read more into the buffer; False on EOF (or reset)."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(max_bytes)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_until(self, marker: bytes, what: str, limit: int = 1 << 20) -> bytes:
        while True:
            idx = self.buf.find(marker)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(marker)])
                del self.buf[: idx + len(marker)]
                return out
            if len(self.buf) > limit:
                raise IncompleteResponse(f"{what}: no {marker!r} within {limit} bytes")
            if not self._fill():
                raise IncompleteResponse(
                    f"connection closed while reading {what} ({bytes(self.buf)[:200]!r})"
                )

    def _read_exact(self, n: int, partial: RawResponse) -> bytes:
        while len(self.buf) < n:
            if not self._fill(min(1 << 20, max(65536, n - len(self.buf)))):
                got = bytes(self.buf)
                self.buf.clear()
                partial.body += got
                raise IncompleteResponse(
                    f"connection closed after {len(partial.body)} body bytes, {n - len(got)} missing", partial
                )
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self) -> RawResponse:
        head = self._read_until(b"\r\n\r\n", "response head")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise IncompleteResponse(f"not an HTTP response: {lines[0]!r}")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return RawResponse(int(code), reason, headers)

    def read_response(self, method: str = "GET") -> RawResponse:
        """Read one final response (collecting 1xx), with its body framed per RFC 9112."""
        informational: list[int] = []
        while True:
            resp = self.read_head()
            if 100 <= resp.status < 200 and resp.status != 101:
                informational.append(resp.status)
                continue
            break
        resp.informational = informational
        self.read_body(resp, method)
        return resp

    def read_body(self, resp: RawResponse, method: str = "GET") -> None:
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return
        te = ",".join(resp.header_all("Transfer-Encoding")).lower()
        if "chunked" in te:
            resp.chunked = True
            while True:
                size_line = self._read_until(b"\r\n", "chunk size")
                size = int(size_line[:-2].split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:
                        line = self._read_until(b"\r\n", "trailers")
                        if line == b"\r\n":
                            return
                        name, _, value = line[:-2].decode("latin-1").partition(":")
                        resp.trailers.append((name, value.strip()))
                resp.body += self._read_exact(size, resp)
                if self._read_exact(2, resp) != b"\r\n":
                    raise IncompleteResponse("chunk data not followed by CRLF", resp)
        cl = resp.header("Content-Length")
        if cl is not None:
            resp.body += self._read_exact(int(cl), resp)
            return
        # Delimited by the end of the connection.
        while self._fill():
            pass
        resp.body += bytes(self.buf)
        self.buf.clear()

    def wait_closed(self, timeout: float) -> tuple[bool, bytes]:
        """Wait up to ``timeout`` for the peer to close; returns (closed, bytes received meanwhile)."""
        deadline = time.monotonic() + timeout
        received = bytearray(self.buf)
        self.buf.clear()
        try:
            while not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, bytes(received)
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                except TimeoutError:
                    return False, bytes(received)
                if not data:
                    self.eof = True
                    break
                received += data
            return True, bytes(received)
        finally:
            self.sock.settimeout(self.timeout)


def build_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str | bytes]] = (),
    body: bytes | None = None,
    *,
    host: str = "gateway.test",
    content_length: bool = True,
) -> bytes:
    """Serialise a request; header values may be bytes (sent verbatim)."""
    out = bytearray(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode())
    for name, value in headers:
        out += name.encode("latin-1") + b": "
        out += value if isinstance(value, bytes) else value.encode("latin-1")
        out += b"\r\n"
    if body is not None and content_length:
        out += b"Content-Length: %d\r\n" % len(body)
    out += b"\r\n"
    if body is not None:
        out += body
    return bytes(out)


def chunked_body(pieces: Iterable[bytes]) -> bytes:
    out = bytearray()
    for piece in pieces:
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
    out += b"0\r\n\r\n"
    return bytes(out)
