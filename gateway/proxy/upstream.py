"""Upstream side: one keep-alive HTTP/1.1 connection to a pod, carrying one exchange at a time.

It parses the response with llhttp (httptools) only to know where the message ends and to
rewrite the head; body bytes go on as they arrive, with their own framing. It reports to the
exchange through the ``ResponseSink`` interface and never touches the client's connection:
reading pauses while the client cannot take more (``client_slow``), so a slow client never
makes the gateway buffer a large response.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpResponseParser

from gateway.proxy.flow import CLIENT_SLOW, FlowControl
from gateway.proxy.response_head import DELIMITED, client_head, framing, parse_head_response
from gateway.proxy.sides import ResponseSink

log = logging.getLogger("shardgate.proxy")

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.pool import PodLink


class UpstreamConnection:  # an asyncio protocol: the loop calls these methods by name
    __slots__ = (
        "_framing",
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
        "flow",
        "idle_since",
        "keep_alive",
        "link",
        "parser",
        "response_done",
        "reused",
        "sent_at",
        "transport",
    )

    def __init__(self, ctx: ProxyContext, link: PodLink) -> None:
        self.ctx = ctx
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.parser = HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.deadline = 0.0
        self.closed = False
        self.keep_alive = True
        self.response_done = False
        self.reused = False  # carried an earlier exchange (so it may be a stale keep-alive)
        self.idle_since = 0.0
        self.sent_at = 0.0
        self.fd = -1
        self._framing = DELIMITED
        self._informational = False
        self._head_buffer: bytearray | None = None  # a HEAD response, delimited by hand
        self._raw: bytes | None = None  # response bytes while the head is incomplete
        self._head_at = 0  # where the (final) response head starts in _raw
        self._head_end = -1  # where it ends, once llhttp has seen all of it
        self._status = 0  # of the response being read (llhttp's reading of the status line)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses; they implement the same API.
        self.transport = transport  # type: ignore[assignment]
        self.flow.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.ctx.upstreams.add(self)
        self.link.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.flow.stopped = True
        self.deadline = 0.0
        self.ctx.upstreams.discard(self)
        self.link.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self.reused, self._framing.until_close)

    def eof_received(self) -> bool:
        return False  # close our side too; a half-closed upstream is of no use

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_full(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_full(False)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.abort()  # bytes nobody asked for (or an early close notice): done
            return
        try:
            self._read(exchange, data)
        except Exception:  # a bug of ours: logged, answered 500 (or cut off), never silent
            log.exception("internal error while handling an upstream response")
            self.abort()
            exchange.internal_error()

    def _read(self, exchange: ResponseSink, data: bytes) -> None:
        if self._head_buffer is not None:
            self._head_response(exchange, data)
        elif not self._parse(exchange, data):
            return
        if self.exchange is not exchange:
            return  # the exchange gave the connection up on seeing the head (a fence's 421)
        if self.response_done:
            self._complete(exchange)
        elif self._status and not self.flow.read_blocks:
            # Mid-body: an upstream silent for the response timeout is cut off (the client
            # sees a truncated response, never a fake end). Paused reads are our doing.
            self.deadline = self.ctx.loop.time() + self.ctx.limits.upstream_header_timeout

    def _parse(self, exchange: ResponseSink, data: bytes) -> bool:
        """Feed llhttp and pass the response on; False when the response is invalid."""
        raw = self._raw
        if raw is not None:
            # Until the head is complete it is kept; a head that arrives whole (the usual
            # case) is used where it lies, without a copy.
            raw = self._raw = raw + data if raw else data
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self._invalid(exchange)
            return False
        if raw is None:
            exchange.response_body(data)  # body bytes, forwarded as they came
        elif self._head_end >= 0:
            self._raw = None
            rest = len(raw) - self._head_end
            # (a small body is copied: cheaper than a memoryview and its slice)
            body = (
                b""
                if not rest
                else raw[self._head_end :]
                if rest < 16384
                else memoryview(raw)[self._head_end :]
            )
            self._emit_head(exchange, raw[self._head_at : self._head_end], body)
        return True

    # -- exchange handling -----------------------------------------------------------------

    def start(self, exchange: ResponseSink, body: list[bytes] | None, now: float) -> None:
        """Send a request (its head plus whatever body is already here) on this connection."""
        self.exchange = exchange
        self.sent_at = now
        self.response_done = False
        self._framing = DELIMITED
        self._head_buffer = bytearray() if exchange.is_head else None
        self._raw = None if exchange.is_head else b""
        self._head_at = 0
        self._head_end = -1
        self.deadline = now + self.ctx.limits.upstream_header_timeout
        self.client_writable(exchange.client_writable())
        head = (exchange.head, self.link.group_line)
        self.send(b"".join((*head, *body)) if body else b"".join(head))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def client_writable(self, writable: bool) -> None:
        """The client's connection can (not) take more: go on (or stop) reading the response."""
        if self.closed:
            return
        if writable:
            if self.flow.unblock_reading(CLIENT_SLOW) and self._status:  # a body transfer goes on
                self.deadline = self.ctx.loop.time() + self.ctx.limits.upstream_header_timeout
        elif self.flow.block_reading(CLIENT_SLOW) and self.exchange is not None:
            self.deadline = 0.0  # the client is slow, not the upstream

    def _emit_head(self, exchange: ResponseSink, head: bytes, body: bytes | memoryview) -> None:
        """The response head (and the body bytes that came with it) to the exchange."""
        now = self.ctx.loop.time()
        self.deadline = 0.0
        self.link.observe_header_latency(now - self.sent_at)
        kept, lower = client_head(head)
        if (self.response_done or exchange.is_head) and not exchange.http10:
            # llhttp found the end already (or there is no body): the framing goes on as it
            # came, and nothing need be looked up.
            self._framing = DELIMITED
        else:
            self._framing = framing(lower, self._status, exchange.is_head, exchange.http10)
        exchange.response_head(kept, self._status, self._framing, body, self.link.group_bytes)

    def _complete(self, exchange: ResponseSink) -> None:
        """The response is complete: pool the connection (or close it), then tell the exchange."""
        self.exchange = None
        now = self.ctx.loop.time()
        if not exchange.request_done:
            self.keep_alive = False  # it never got the whole request; reuse would desync it
        self.client_writable(True)
        self.link.release(self, now, self.ctx)
        exchange.response_complete(now)

    def idle_at(self, now: float, deadline: float) -> None:
        self.idle_since = now
        self.deadline = deadline

    def usable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def _invalid(self, exchange: ResponseSink) -> None:
        self.abort()
        exchange.upstream_invalid()

    def on_deadline(self, now: float) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # idle too long in the pool
        else:
            self.abort()
            exchange.upstream_timeout()

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
    # no Python call per header or body piece.

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

    def _head_response(self, exchange: ResponseSink, data: bytes) -> None:
        """A response to HEAD, delimited by hand: llhttp cannot be told no body follows."""
        buffer = self._head_buffer
        assert buffer is not None
        buffer += data
        found = parse_head_response(buffer)
        if found is None:
            return
        if found is False:
            self._invalid(exchange)
            return
        assert not isinstance(found, bool)
        self._head_buffer = None
        self._status = found.status
        self.keep_alive = found.keep_alive
        self.response_done = True
        self._emit_head(exchange, found.head, b"")
