"""Upstream side: one keep-alive HTTP/1.1 connection to a pod, and the per-pod idle pool.

An ``UpstreamConnection`` carries one exchange at a time. It parses the response with llhttp
(httptools) only to know where the message ends and to rewrite the header block; body bytes
are handed to the client as they arrive (chunked responses keep chunked framing), and reading
pauses whenever the client's write buffer is full, so a slow client never makes the gateway
buffer a large response.
"""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpResponseParser

from gateway.proxy.context import BLOCK_UPSTREAM
from gateway.proxy.http import CONNECTION_OPTIONS, HOP_BY_HOP, LAST_CHUNK
from gateway.topology import Pod

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.server import Exchange

_NO_BODY_STATUSES = frozenset({204, 304})
# Response headers the gateway sets itself; an upstream's copy would duplicate them.
_GATEWAY_RESPONSE_HEADERS = frozenset({b"x-shard-group", b"x-request-id"})


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_body_chunked",
        "_head_buffer",
        "_headers",
        "_informational",
        "_reason",
        "closed",
        "ctx",
        "deadline",
        "exchange",
        "fd",
        "idle_since",
        "keep_alive",
        "parser",
        "pod",
        "read_paused",
        "response_done",
        "reused",
        "sent_at",
        "transport",
        "until_close",
    )

    def __init__(self, ctx: ProxyContext, pod: Pod) -> None:
        self.ctx = ctx
        self.pod = pod
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.deadline = 0.0
        self.closed = False
        self.keep_alive = True
        self.response_done = False
        self.read_paused = False
        self.reused = False  # carried an earlier exchange (so it may be a stale keep-alive)
        self.until_close = False  # the response body ends when the upstream closes
        self.idle_since = 0.0
        self.sent_at = 0.0
        self.fd = -1
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._informational = False
        self._body_chunked = False
        self._head_buffer: bytearray | None = None  # HEAD responses are delimited by hand

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses; they implement the same API.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.ctx.upstreams.add(self)
        self.pod.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = 0.0
        self.ctx.upstreams.discard(self)
        self.pod.connections -= 1
        try:
            self.pod.idle.remove(self)
        except ValueError:
            pass
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self)

    def eof_received(self) -> bool:
        return False  # close our side too; a half-closed upstream is of no use

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.block_reading(BLOCK_UPSTREAM)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.unblock_reading(BLOCK_UPSTREAM)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for (or an early close notice): this connection is done.
            self.abort()
            return
        if self._head_buffer is not None:
            self._head_data(exchange, data)
        else:
            try:
                self.parser.feed_data(data)
            except HttpParserError:
                exchange.upstream_invalid(self)
                return
        exchange.client.flush_output()
        if self.response_done:
            exchange.response_complete(self)

    # -- exchange handling -----------------------------------------------------------------

    def start(self, exchange: Exchange, data: bytes, head_only: bool, now: float) -> None:
        """Send one request (head plus whatever body is already here) on this connection."""
        self.exchange = exchange
        self.sent_at = now
        self.response_done = False
        self.until_close = False
        self._head_buffer = bytearray() if head_only else None
        self.deadline = now + self.ctx.limits.upstream_header_timeout
        transport = self.transport
        assert transport is not None
        if self.read_paused != exchange.client.write_paused:
            self.set_reading(not exchange.client.write_paused)
        transport.write(data)

    def set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if reading and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        elif not reading and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()

    def on_deadline(self, now: float) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # idle too long in the pool
        else:
            exchange.upstream_timeout(self)

    def close(self) -> None:
        self.deadline = 0.0
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.deadline = 0.0
        self.exchange = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response_done:
            # A second response on a request/response connection: the upstream is broken.
            raise HttpParserError("unsolicited response")
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # 1xx: the gateway answers Expect itself; interim responses are not relayed.
            self._informational = True
            return
        exchange = self.exchange
        assert exchange is not None
        self.deadline = 0.0
        self._observe_response_headers()
        chunked = self._emit_head(exchange, status, self._reason, self._headers, head_only=False)
        self._body_chunked = chunked and not exchange.http10

    def on_body(self, body: bytes) -> None:
        out = self.exchange.client.out  # type: ignore[union-attr]
        if self._body_chunked:
            out.append(b"%x\r\n" % len(body))
            out.append(body)
            out.append(b"\r\n")
        else:
            out.append(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._body_chunked:
            self.exchange.client.out.append(LAST_CHUNK)  # type: ignore[union-attr]
        self.keep_alive = self.parser.should_keep_alive()
        self.response_done = True

    # -- response head -----------------------------------------------------------------------

    def _observe_response_headers(self) -> None:
        ctx = self.ctx
        ctx.metrics.response_headers(self.pod.group).observe(ctx.loop.time() - self.sent_at)

    def _emit_head(
        self,
        exchange: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        head_only: bool,
    ) -> bool:
        """Queue the rewritten response head for the client; return whether the body is chunked."""
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        chunked = False
        has_length = False
        extra_hop: set[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    tokens = {t.strip().lower() for t in value.split(b",")} - CONNECTION_OPTIONS
                    if tokens:
                        extra_hop = (extra_hop or set()) | tokens
                continue
            if lname == b"transfer-encoding":
                chunked = value.rstrip().lower().endswith(b"chunked")
                if exchange.http10:
                    continue
            elif lname == b"content-length":
                has_length = True
            elif lname in _GATEWAY_RESPONSE_HEADERS:
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        if extra_hop:
            parts = [parts[0]] + [p for p in parts[1:] if p.split(b":", 1)[0].lower() not in extra_hop]
        parts.append(b"X-Shard-Group: %s\r\nX-Request-ID: %s\r\n" % (exchange.group_bytes, exchange.rid))
        bodiless = head_only or status in _NO_BODY_STATUSES
        self.until_close = not bodiless and not has_length and not chunked
        if self.until_close or (chunked and exchange.http10):
            exchange.keep_alive = False  # the client's body ends when the connection does
        if not exchange.keep_alive or exchange.client.ctx.draining:
            exchange.keep_alive = False
            parts.append(b"Connection: close\r\n")
        elif exchange.http10:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        exchange.response_started(status)
        exchange.client.out.append(b"".join(parts))
        return chunked

    def _head_data(self, exchange: Exchange, data: bytes) -> None:
        """Delimit a HEAD response by hand: llhttp cannot be told that no body follows."""
        buffer = self._head_buffer
        assert buffer is not None
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    exchange.upstream_invalid(self)
                return
            head = bytes(buffer[:end])
            rest = buffer[end + 4 :]
            lines = head.split(b"\r\n")
            status_line = lines[0].split(b" ", 2)
            if (
                len(status_line) < 2
                or not status_line[0].startswith(b"HTTP/1.")
                or not status_line[1].isdigit()
            ):
                exchange.upstream_invalid(self)
                return
            status = int(status_line[1])
            if status < 200:
                buffer[:] = rest
                continue
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep or not name or name != name.strip():
                    exchange.upstream_invalid(self)
                    return
                headers.append((name, value.strip()))
            connection = b",".join(v for n, v in headers if n.lower() == b"connection").lower()
            self.keep_alive = not rest and b"close" not in connection and status_line[0] == b"HTTP/1.1"
            self.deadline = 0.0
            self._observe_response_headers()
            self._head_buffer = None
            self._emit_head(exchange, status, status_line[2] if len(status_line) > 2 else b"", headers, True)
            self.response_done = True
            return


# -- the per-pod idle pool -------------------------------------------------------------------


def acquire_idle(pod: Pod, now: float) -> UpstreamConnection | None:
    """The most recently used live idle connection of ``pod`` (warm in every cache), if any.

    A connection that sat idle for a while is checked for a close notice the event loop has
    not processed yet (servers close idle keep-alive connections on their own schedule);
    sending a request into such a connection would fail after the request left us.
    """
    idle = pod.idle
    while idle:
        conn: UpstreamConnection = idle.pop()
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            continue
        if now - conn.idle_since > STALE_CHECK_AFTER and _has_pending_input(conn.fd):
            conn.abort()  # EOF, reset or stray bytes: nothing a new request could use
            continue
        conn.reused = True
        return conn
    return None


# Checking costs a poll() (~1-2 us); connections reused within this many seconds skip it.
STALE_CHECK_AFTER = 0.05
_POLLER = select.poll()
_INPUT_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def _has_pending_input(fd: int) -> bool:
    """Whether an idle socket has something to read: for an idle upstream, a close or garbage."""
    if fd < 0:
        return False
    _POLLER.register(fd, _INPUT_EVENTS)
    try:
        return bool(_POLLER.poll(0))
    finally:
        _POLLER.unregister(fd)


def release(conn: UpstreamConnection, now: float) -> None:
    """Return a connection whose exchange finished cleanly to its pod's pool, or close it."""
    conn.exchange = None
    pod = conn.pod
    limits = conn.ctx.limits
    if (
        conn.closed
        or not conn.keep_alive
        or not pod.eligible
        or conn.ctx.draining
        or len(pod.idle) >= limits.max_idle_per_pod
    ):
        conn.close()
        return
    conn.set_reading(True)  # an idle connection must read, to notice the upstream closing it
    conn.deadline = now + limits.upstream_idle_timeout
    conn.idle_since = now
    pod.idle.append(conn)


def close_idle(pod: Pod) -> None:
    """A pod left the eligible set: close its idle connections now (busy ones close when done)."""
    idle = list(pod.idle)
    pod.idle.clear()
    for conn in idle:
        conn.close()


async def open_connection(ctx: ProxyContext, pod: Pod) -> UpstreamConnection:
    """Connect to ``pod`` within the connect timeout; raises OSError or TimeoutError."""
    started = ctx.loop.time()
    async with asyncio.timeout(ctx.limits.connect_timeout):
        _, conn = await ctx.loop.create_connection(lambda: UpstreamConnection(ctx, pod), pod.host, pod.port)
    ctx.metrics.upstream_connects += 1
    ctx.metrics.connect(pod.group).observe(ctx.loop.time() - started)
    return conn
