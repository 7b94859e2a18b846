"""Upstream side: one keep-alive HTTP/1.1 connection to a pod, and the per-pod idle pool.

An ``UpstreamConnection`` carries one exchange at a time. It parses the response with llhttp
(httptools) only to know where the message ends and to rewrite the header block; body bytes
are handed to the client as they arrive (chunked responses keep chunked framing), and reading
pauses whenever the client's write buffer is full, so a slow client never makes the gateway
buffer a large response.
"""

from __future__ import annotations

import asyncio
import re
import select
from bisect import bisect_left
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpResponseParser

from gateway.proxy.context import BLOCK_UPSTREAM
from gateway.proxy.http import CONNECTION_OPTIONS, HOP_BY_HOP
from gateway.topology import Pod, PodState

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.server import Exchange

_NO_BODY_STATUSES = frozenset({204, 304})
_READY = PodState.READY
# Response headers the gateway sets itself; an upstream's copy would duplicate them.
_GATEWAY_RESPONSE_HEADERS = frozenset({b"x-shard-group", b"x-request-id"})


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_dechunker",
        "_head_at",
        "_head_buffer",
        "_head_end",
        "_informational",
        "_raw",
        "_status",
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
        self._informational = False
        self._head_buffer: bytearray | None = None  # HEAD responses are delimited by hand
        self._raw: bytes | None = None  # response bytes while its head is incomplete
        self._dechunker: HttpResponseParser | None = None  # see _Dechunker
        self._head_at = 0  # where the (final) response head starts in _raw
        self._head_end = -1  # where it ends, once llhttp has seen all of it
        self._status = 0  # of the response being read (llhttp's reading of the status line)

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
        ctx = self.ctx
        now = 0.0  # the loop's time, asked once per read (it does not move within a callback)
        if self._head_buffer is not None:
            self._head_data(exchange, data)
        else:
            raw = self._raw
            if raw is not None:
                # Until the head is complete it is rewritten from these bytes; a head that
                # arrives whole (the usual case) is used where it lies, without a copy.
                raw = self._raw = raw + data if raw else data
            try:
                self.parser.feed_data(data)
            except HttpParserError:
                exchange.upstream_invalid(self)
                return
            if raw is None:
                if self._dechunker is None:
                    exchange.client.out.append(data)  # body bytes, forwarded as they came
                else:
                    self._dechunker.feed_data(data)
            elif self._head_end >= 0:
                self._raw = None
                head_end = self._head_end
                # The usual case: head and (some of the) body in one read, sent on as one piece.
                rest = len(raw) - head_end
                # (a small body is copied: cheaper than a memoryview and its slice)
                body = b"" if not rest else raw[head_end:] if rest < 16384 else memoryview(raw)[head_end:]
                now = ctx.loop.time()
                self._emit_head(exchange, raw[self._head_at : head_end], False, now, body)
        client = exchange.client
        out = client.out
        if out and not client.closed:  # client.flush_output(), inlined
            data = out[0] if len(out) == 1 else b"".join(out)
            ctx.metrics.bytes_sent += len(data)
            client.transport.write(data)  # type: ignore[union-attr]
            out.clear()
        if self.response_done:
            # Answered (Exchange's own bookkeeping, inlined: one Python call less per request).
            exchange.response_done = True
            exchange.upstream = None
            if not exchange.request_done:
                self.keep_alive = False  # it never got the whole request; reuse would desync it
                exchange.keep_alive = False
            if not now:
                now = ctx.loop.time()
            # Back to the pod's pool, or closed (the one place a connection is pooled):
            self.exchange = None
            pod = self.pod
            limits = ctx.limits
            if (
                self.closed
                or not self.keep_alive
                or pod.state is not _READY
                or ctx.draining
                or len(pod.idle) >= limits.max_idle_per_pod
            ):
                self.close()
            else:
                if self.read_paused:
                    self.set_reading(True)
                self.deadline = now + limits.upstream_idle_timeout
                self.idle_since = now
                pod.idle.append(self)
            client.exchange_done(exchange, now)
        elif exchange.status and not self.read_paused:
            # Mid-body: an upstream silent for the response timeout is cut off (the client
            # sees a truncated response, never a fake end). Paused reads are our doing, not its.
            self.deadline = ctx.loop.time() + ctx.limits.upstream_header_timeout

    # -- exchange handling -----------------------------------------------------------------

    def start(self, exchange: Exchange, now: float) -> None:
        """Send one request (its head plus whatever body is already here) on this connection."""
        exchange.upstream = self
        exchange.sent = True
        pending = exchange.pending
        group_line = self.pod.group_line  # "X-Shard-Group: <group>" and the blank line
        if not pending:
            data = exchange.head + group_line
        else:
            if len(pending) == 1:  # the usual body: it came with the head
                data = b"".join((exchange.head, group_line, pending[0]))
            else:
                data = b"".join((exchange.head, group_line, *pending))
            pending.clear()
            exchange.pending_bytes = 0
        head_only = exchange.is_head
        self.exchange = exchange
        self.sent_at = now
        self.response_done = False
        self.until_close = False
        self._head_buffer = bytearray() if head_only else None
        self._raw = None if head_only else b""
        self._dechunker = None
        self._head_at = 0
        self._head_end = -1
        self.deadline = now + self.ctx.limits.upstream_header_timeout
        transport = self.transport
        assert transport is not None
        if self.read_paused is not exchange.client.write_paused:
            self.set_reading(not exchange.client.write_paused)
        transport.write(data)

    def set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if reading and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
            exchange = self.exchange
            if exchange is not None and exchange.status:  # a body transfer goes on
                self.deadline = self.ctx.loop.time() + self.ctx.limits.upstream_header_timeout
        elif not reading and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
            if self.exchange is not None:
                self.deadline = 0.0  # the client is slow, not the upstream

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
    # Only message boundaries are needed: without on_header/on_body methods, httptools makes
    # no Python call per header or body piece. The head is rewritten from the raw bytes and
    # the body is forwarded exactly as it arrived (chunked framing included).

    def on_message_begin(self) -> None:
        if self.response_done:
            # A second response on a request/response connection: the upstream is broken.
            raise HttpParserError("unsolicited response")

    def on_headers_complete(self) -> None:
        raw = self._raw
        assert raw is not None
        end = raw.find(b"\r\n\r\n", self._head_at)
        if end < 0:
            raise HttpParserError("response head without CRLF line ends")
        self._status = status = self.parser.get_status_code()
        if status < 200:
            # 1xx: the gateway answers Expect itself; interim responses are not relayed.
            self._head_at = end + 4
            self._informational = True
            return
        self._head_end = end + 4

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.response_done = True

    # -- response head -----------------------------------------------------------------------

    def _emit_head(
        self, exchange: Exchange, head: bytes, head_only: bool, now: float, body: bytes | memoryview = b""
    ) -> None:
        """Queue the response head (and the ``body`` bytes that came with it) for the client,
        rewritten in place: hop-by-hop fields out, X-Shard-Group and X-Request-ID in,
        everything else byte for byte."""
        self.deadline = 0.0
        pod = self.pod
        histogram = pod.header_latency
        if histogram is None:  # resolved once per pod, not per response
            histogram = pod.header_latency = self.ctx.metrics.response_headers(pod.group)
        waited = now - self.sent_at
        histogram.buckets[bisect_left(histogram.bounds, waited)] += 1  # Histogram.observe, inlined
        histogram.total += waited
        status = self._status
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1" + head[8:]  # we speak 1.1 to the client, whatever they did
        end = len(head) - 4  # the fields end here; the blank line is re-added below
        lower = head.lower()  # (the status line cannot match a "\r\n"-led search below)
        hop = _REWRITE.search(lower)
        if hop is None:
            kept = head[:end]
        else:
            at = hop.start()
            stop = at + len(_KEEP_ALIVE_FIELD)
            if lower.startswith(_KEEP_ALIVE_FIELD, at) and (
                stop == end  # the last field (nginx): nothing after it to search
                or (lower.startswith(b"\r\n", stop) and _REWRITE.search(lower, stop) is None)
            ):
                # Just "Connection: keep-alive" (nginx, most servers): cut that one field
                # (``lower`` keeps it: it is only searched for framing fields below).
                kept = head[:at] if stop == end else head[:at] + head[stop:end]
            else:
                line_end = head.find(b"\r\n")
                kept = head[:line_end] + _without_hop_by_hop(head[line_end:end], lower[line_end:end])
                lower = kept.lower()
        if (self.response_done or head_only) and not exchange.http10:
            # llhttp found the end of this response already (or there is no body): it was
            # framed, and the framing goes on as it came. Nothing to look up.
            chunked = False
        else:
            # (bytes.find: ``in`` on bytes goes through the buffer protocol and costs more.)
            has_length = lower.find(b"\r\ncontent-length:") >= 0
            # llhttp refuses a response with both, so only one without a length can be chunked
            # (HEAD responses are not parsed by llhttp, but have no body to frame either).
            chunked = not has_length and lower.find(b"\r\ntransfer-encoding:") >= 0 and _is_chunked(lower)
            if chunked and exchange.http10 and not head_only:
                # An HTTP/1.0 client cannot read chunked framing: decode it, end with the close.
                line_end = kept.find(b"\r\n")
                fields = _without_fields(kept[line_end:], lower[line_end:], {b"transfer-encoding"})
                kept = kept[:line_end] + fields
                self._dechunker = _Dechunker.parser(exchange.client.out)
            bodiless = head_only or status in _NO_BODY_STATUSES or 100 <= status < 200
            self.until_close = not bodiless and not has_length and not chunked
            if self.until_close or (chunked and exchange.http10):
                exchange.keep_alive = False  # the client's body ends when the connection does
        ctx = self.ctx
        if not exchange.keep_alive or ctx.draining or ctx.closing:
            exchange.keep_alive = False
            connection = b"\r\nConnection: close"
        elif exchange.http10:
            connection = b"\r\nConnection: keep-alive"
        else:
            connection = b""
        exchange.status = status
        # One join (about a third cheaper than %-formatting the same pieces); the body bytes
        # that came with the head go along, unless they must be decoded first.
        dechunker = self._dechunker
        exchange.client.out.append(
            b"".join(
                (
                    kept,
                    _GROUP_FIELD,
                    self.pod.group_bytes,
                    _ID_FIELD,
                    exchange.rid,
                    connection,
                    _HEAD_END,
                    b"" if dechunker else body,
                )
            )
        )
        if dechunker is not None and body:
            dechunker.feed_data(body)

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
            head = bytes(buffer[: end + 4])
            rest = buffer[end + 4 :]
            version, _, rest_of_line = head.partition(b" ")
            code = rest_of_line[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit():
                exchange.upstream_invalid(self)
                return
            if int(code) < 200:
                buffer[:] = rest
                continue
            lower = head.lower()
            self.keep_alive = (
                not rest
                and version == b"HTTP/1.1"
                and re.search(rb"\r\nconnection:[^\r]*close", lower) is None
            )
            self._head_buffer = None
            self._status = int(code)
            self._emit_head(exchange, head, True, self.ctx.loop.time())
            self.response_done = True
            return


_GROUP_FIELD = b"\r\nX-Shard-Group: "
_ID_FIELD = b"\r\nX-Request-ID: "
_HEAD_END = b"\r\n\r\n"
_KEEP_ALIVE_FIELD = b"\r\nconnection: keep-alive"
_HOP_NAMES = b"|".join(sorted(HOP_BY_HOP | _GATEWAY_RESPONSE_HEADERS))
# A field the client must not get from the upstream (searched in the lower-cased field block).
_REWRITE = re.compile(rb"\r\n(?:" + _HOP_NAMES + rb")[ \t]*:")


def _without_hop_by_hop(fields: bytes, lower: bytes) -> bytes:
    """Drop hop-by-hop fields (and those the Connection field names) and the gateway's own."""
    pieces = []
    kept_from = 0
    named: set[bytes] = set()
    for match in _REWRITE.finditer(lower):
        start = match.start()
        end = lower.find(b"\r\n", match.end())
        if end < 0:
            end = len(lower)
        if lower.startswith(b"\r\nconnection", start):
            tokens = lower[match.end() : end].split(b",")
            named.update(t.strip() for t in tokens if t.strip() not in CONNECTION_OPTIONS)
        pieces.append(fields[kept_from:start])
        kept_from = end
    pieces.append(fields[kept_from:])
    result = b"".join(pieces)
    if named:  # "Connection: X-Foo" makes X-Foo hop-by-hop too (rare)
        result = _without_fields(result, result.lower(), named)
    return result


def _without_fields(fields: bytes, lower: bytes, names: set[bytes]) -> bytes:
    """``fields`` (a "\\r\\nName: value" sequence) without the fields called ``names``."""
    kept = []
    start = 0
    while start < len(fields):
        end = fields.find(b"\r\n", start + 2)
        if end < 0:
            end = len(fields)
        name = lower[start + 2 : end].split(b":", 1)[0].rstrip()
        if name not in names:
            kept.append(fields[start:end])
        start = end
    return b"".join(kept)


class _Dechunker:
    """Turns chunked body bytes into plain ones, for a client that cannot read chunks."""

    __slots__ = ("out",)

    def __init__(self, out: list[bytes | memoryview]) -> None:
        self.out = out

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    @classmethod
    def parser(cls, out: list[bytes | memoryview]) -> HttpResponseParser:
        parser = HttpResponseParser(cls(out))
        parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        return parser


def _is_chunked(lower: bytes) -> bool:
    at = lower.find(b"\r\ntransfer-encoding:")
    if at < 0:
        return False
    end = lower.find(b"\r\n", at + 2)
    return lower[at : end if end >= 0 else len(lower)].rstrip().endswith(b"chunked")


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
