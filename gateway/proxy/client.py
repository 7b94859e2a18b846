"""Client side of the data plane: one ``ClientConnection`` per accepted socket.

The connection owns what lives as long as the socket: the llhttp parser, the queue of
pipelined exchanges (answered strictly in order: a request waits, its body buffered and reading
paused, until the one before it is answered), flow control, the deadline and the output. The
state of each request lives on its ``Exchange``; what is read of a head and what goes upstream
is worked out by the pure functions of ``request_head``.

Reading a request, top to bottom: ``data_received`` -> llhttp calls ``on_url`` (a request
begins), ``on_header`` per field, ``on_headers_complete`` (classify the fields, check the
request, route it, build the upstream head), ``on_body``, ``on_message_complete``; then
``_advance`` starts the oldest exchange not yet started (``Exchange.start``: refused, or sent to
a pod). Its response comes back through the exchange (``send``), and ``exchange_done`` accounts
for it and moves on to the next request or closes.
"""

from __future__ import annotations

import asyncio
import logging

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway.observability.tracing import parse_traceparent
from gateway.proxy.accounting import CLIENT_CLOSED, record
from gateway.proxy.context import ProxyContext
from gateway.proxy.exchange import DONE, INTERNAL_ERROR, QUEUED, STREAMING, Exchange
from gateway.proxy.flow import BROKEN, PENDING, PIPELINE, UPSTREAM_FULL, FlowControl
from gateway.proxy.http import error_response, valid_host
from gateway.proxy.ratelimit import ASK_REMOTE
from gateway.proxy.request_head import (
    RequestFields,
    field_block,
    head_size,
    read_fields,
    sliced_field_lines,
    upstream_head,
)
from gateway.proxy.sides import ClientSide
from gateway.router import REPEATED_KEY, Refusal, decide, is_write
from gateway.topology import Decision, Topology

log = logging.getLogger("shardgate.proxy")

PENDING_LIMIT = 256 * 1024  # body bytes buffered while an upstream connection is set up
BAD_HOST = Refusal(400, "bad_request", "an HTTP/1.1 request needs exactly one valid Host field")
HEADERS_TOO_LARGE = Refusal(431, "headers_too_large", "request headers are too large")
BODY_TOO_LARGE = Refusal(413, "body_too_large", "request body is larger than allowed")
_NO_ACTIONS: dict[bytes, int] = {}


class _ParseAbort(Exception):
    """Raised in a parser callback to stop parsing: the request was refused already."""


class ClientConnection(ClientSide):  # an asyncio protocol: the loop calls these methods by name
    __slots__ = (
        "_fields",
        "_fresh_read",
        "_head_bytes",
        "_reading_head",
        "_url",
        "closed",
        "ctx",
        "deadline",
        "exchanges",
        "flow",
        "parser",
        "parsing",
        "peer",
        "transport",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.peer = b""
        # Requests answered in order (pipelining). A list, not a deque: it is rarely longer than
        # one, and an empty list is 56 bytes against 600 (x 10,000 idle connections).
        self.exchanges: list[Exchange] = []
        self.parsing: Exchange | None = None  # the request whose head or body is being read
        self.closed = False
        self.deadline = 0.0
        self._fields: list[tuple[bytes, bytes]] = []  # of the head being read
        self._url = b""
        self._head_bytes = 0
        self._reading_head = False
        self._fresh_read: bytes | None = None  # this read, when a request head begins at its start

    def writable(self) -> bool:
        return not self.flow.write_paused

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses; they implement the same API.
        self.transport = self.flow.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        ctx = self.ctx
        ctx.clients.add(self)
        ctx.metrics.client_connections_open += 1
        ctx.metrics.client_connections_total += 1
        self.deadline = ctx.loop.time() + ctx.limits.client_header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.flow.stopped = True
        self.deadline = 0.0
        ctx = self.ctx
        ctx.clients.discard(self)
        ctx.metrics.client_connections_open -= 1
        exchanges, self.exchanges = self.exchanges, []
        for exchange in exchanges:
            exchange.release()
            upstream, exchange.upstream = exchange.upstream, None
            if upstream is not None:
                upstream.abort()  # mid-exchange: its response can no longer be delivered
            if exchange.held_until:
                ctx.held.discard(exchange)  # a held write (queued again after a fence's 421 too)
            if (exchange.started or exchange.held_until) and exchange.state != DONE:
                exchange.state = DONE
                record(ctx, exchange, CLIENT_CLOSED, ctx.loop.time(), self.peer)

    def eof_received(self) -> bool:
        return False  # the client half-closed: close our side too (asyncio.Protocol's default)

    def pause_writing(self) -> None:
        self.flow.write_paused = True
        self._tell_upstream_client_writable(False)

    def resume_writing(self) -> None:
        self.flow.write_paused = False
        self._tell_upstream_client_writable(True)

    def _tell_upstream_client_writable(self, writable: bool) -> None:
        upstream = self.exchanges[0].upstream if self.exchanges else None
        if upstream is not None:
            upstream.client_writable(writable)

    def data_received(self, data: bytes) -> None:
        if self.flow.read_blocks & BROKEN:
            return
        self.ctx.metrics.bytes_received += len(data)
        try:
            self._note_read(data)
            if self._feed(data):
                self._check_unfinished_head()
            self._advance()
        except Exception as exc:  # a bug of ours: answered 500 and logged, never a silent close
            self._internal_error(exc)

    def _note_read(self, data: bytes) -> None:
        """Where this read falls: in a head, in a body, or (the usual case) between requests."""
        if self._reading_head:
            self._head_bytes += len(data)
            self._fresh_read = None
        elif self.parsing is not None:
            # Body in progress: a client that stalls mid-body is cut off after the idle timeout.
            self.deadline = self.ctx.loop.time() + self.ctx.limits.client_idle_timeout
            self._fresh_read = None
        else:
            self._fresh_read = data  # the next request begins in these bytes

    def _feed(self, data: bytes) -> bool:
        """Hand the bytes to llhttp; False when the connection cannot go on parsing."""
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # Upgrade is not supported: the request goes out without its Upgrade field, and
            # what follows it on this connection is not HTTP/1.1 we could parse.
            if self.exchanges:
                self.exchanges[-1].keep_alive = False
            self._stop_reading()
            return False
        except HttpParserCallbackError as exc:
            # httptools wraps what a callback raised; the original is its __context__.
            if not isinstance(exc.__context__, _ParseAbort):  # (a _ParseAbort was answered)
                self._internal_error(exc.__context__ or exc)
            return False
        except HttpParserError as exc:
            self._protocol_error(Refusal(400, "bad_request", f"malformed HTTP request: {_reason(exc)}"))
            return False
        return True

    def _check_unfinished_head(self) -> None:
        """After a read: a head still incomplete may already be over the limit."""
        if self._reading_head:
            if self._head_bytes < 0:  # it began in this read: count its fields so far
                self._head_bytes = head_size(self._url, self._fields)
            if self._head_bytes > self.ctx.limits.max_header_bytes:
                self._protocol_error(HEADERS_TOO_LARGE)
        elif self.parsing is not None:
            # A body is still to come (its head was complete): the idle timeout applies.
            self.deadline = self.ctx.loop.time() + self.ctx.limits.client_idle_timeout

    # -- httptools callbacks -----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if self._reading_head:
            self._url += url  # the rest of a target that arrived in pieces
            return
        # A request begins: its target is llhttp's first callback for it (an on_message_begin
        # would be one more Python call per request).
        now = self.ctx.loop.time()
        self.parsing = Exchange(self, now)
        self._url = url  # (self._fields is empty: on_headers_complete took the last head's)
        self._head_bytes = -1  # not counted: a head that arrives whole is measured once
        self._reading_head = True
        self.deadline = now + self.ctx.limits.client_header_timeout

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only the append: the head's size is checked once it is complete (or at the end of a
        # read that left it incomplete), not per field.
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._reading_head = False
        exchange = self.parsing
        assert exchange is not None
        self.exchanges.append(exchange)
        exchange.head_complete(self.parser.get_method())
        # The head is the exchange's now: an idle connection keeps nothing of it.
        exchange.target, self._url = self._url, b""
        parsed, self._fields = self._fields, []
        ctx = self.ctx
        topology = ctx.holder.current
        actions = topology.header_actions if topology is not None else _NO_ACTIONS
        fields = read_fields(parsed, actions, topology, ctx.body_limit_digits)
        raw, self._fresh_read = self._fresh_read, None  # a pipelined second head starts elsewhere
        sliced = sliced_field_lines(raw) if raw is not None else None
        size = len(sliced) if sliced is not None else head_size(b"", parsed)
        if size > ctx.limits.max_header_bytes:
            self._protocol_error(HEADERS_TOO_LARGE)
            raise _ParseAbort
        self._read_connection_options(exchange, fields)
        exchange.rid = fields.request_id or next(ctx.next_id)
        exchange.traceparent = fields.traceparent
        exchange.expect_continue = fields.expect_continue
        exchange.chunked = fields.chunked
        refusal = self._route(exchange, fields, topology)
        if refusal is not None and not self._hold(exchange, refusal, fields, topology):
            exchange.refusal = refusal
            return
        assert topology is not None
        exchange.head = self._upstream_head(exchange, parsed, fields, topology, sliced)

    def _read_connection_options(self, exchange: Exchange, fields: RequestFields) -> None:
        parser = self.parser
        exchange.keep_alive = keep_alive = parser.should_keep_alive()
        # Keep-alive without a Connection field means HTTP/1.1 or later (1.0 needs
        # "Connection: keep-alive"), so the version is asked for (a str.format in httptools)
        # only when a Connection field was sent or the connection is to close.
        exchange.http10 = (not keep_alive or fields.has_connection) and parser.get_http_version() == "1.0"

    def _route(self, exchange: Exchange, fields: RequestFields, topology: Topology | None) -> Refusal | None:
        """Check the request and decide where it may go; the refusal when it may go nowhere."""
        method = exchange.method
        if fields.host_count != 1 and (fields.host_count or self.parser.get_http_version() != "1.0"):
            exchange.keep_alive = False  # RFC 9112 3.2: HTTP/1.1 needs one Host, and none has two
            return BAD_HOST
        if fields.host is not None and not valid_host(fields.host):
            exchange.keep_alive = False
            return BAD_HOST
        decision = (
            decide(topology, method, fields.key, fields.operation) if fields.key_count < 2 else REPEATED_KEY
        )
        if isinstance(decision, Refusal):
            # Two key fields: a backend reading the other one would write a key this group does
            # not own. Refused, never guessed.
            exchange.is_write = topology is not None and is_write(topology, method, fields.operation)
            return decision
        if decision.is_write:
            exchange.is_write = True
            # Kept for a resend after a fenced pod's 421, decided again on the newest view.
            exchange.key, exchange.operation = fields.key, fields.operation
        if fields.content_length > self.ctx.limits.max_body_bytes:
            exchange.keep_alive = False
            return BODY_TOO_LARGE
        exchange.decision = decision
        if self.ctx.limiter.active:
            return self._rate_limit(exchange, decision, fields.key, topology)
        return None

    def _rate_limit(
        self, exchange: Exchange, decision: Decision, raw_key: bytes | None, topology: Topology | None
    ) -> Refusal | None:
        """Take the request's tokens (docs/contract.md "Rate limits"): the 429 when a bucket is
        empty. A key counts with its owner group (a read's too, wherever it is served); a read
        whose key is not valid counts as one without a key."""
        group = decision.group
        if group is None and raw_key is not None and topology is not None:
            group = topology.ring.cached_owner(raw_key)  # (validated and cached by decide)
        key = raw_key.strip(b" \t") if raw_key is not None and group is not None else None
        limiter = self.ctx.limiter
        refusal = limiter.check(group, key, exchange.start_time)
        if refusal is ASK_REMOTE:
            assert key is not None and limiter.remote is not None  # (only a key's bucket is remote)
            exchange.limit_pending = True  # it waits, its body read, for Redis's answer
            limiter.remote(exchange, group, key)
            return None
        return refusal

    def _hold(
        self, exchange: Exchange, refusal: Refusal, fields: RequestFields, topology: Topology | None
    ) -> bool:
        """Whether a write refused because its key is moving is held instead (up to
        ``handoff.hold_seconds``; its body is read and kept), to go once the key has an owner."""
        if refusal.code != "shard_moving" or not exchange.is_write or topology is None:
            return False
        hold = topology.config.handoff.hold_seconds
        if hold <= 0 or fields.content_length > self.ctx.limits.max_body_bytes:
            return False
        exchange.held_until = self.ctx.loop.time() + hold
        exchange.key, exchange.operation = fields.key, fields.operation
        return True

    def _upstream_head(
        self,
        exchange: Exchange,
        parsed: list[tuple[bytes, bytes]],
        fields: RequestFields,
        topology: Topology,
        sliced: bytes | None,
    ) -> bytes:
        """The head that goes upstream (a sampled request gets a span and its own traceparent)."""
        traceparent = None
        tracing = self.ctx.tracing
        if tracing is not None:
            parent = parse_traceparent(fields.traceparent) if fields.traceparent is not None else None
            trace_id = tracing.sampled_trace_id(parent)
            if trace_id:
                traceparent = self._start_span(exchange, fields, topology, parent, trace_id)
                if fields.traceparent_at >= 0:
                    fields.remove(fields.traceparent_at)
        forwarded = field_block(sliced, parsed, fields.removed)
        version = b" HTTP/1.0\r\n" if exchange.http10 else b" HTTP/1.1\r\n"
        request_line = b"".join((exchange.method, b" ", exchange.target, version))
        return upstream_head(
            request_line,
            forwarded,
            fields,
            exchange.rid,
            self.peer,
            topology.epoch_bytes,
            traceparent,
            exchange.http10,
        )

    def _start_span(
        self,
        exchange: Exchange,
        fields: RequestFields,
        topology: Topology,
        parent: tuple[int, int, bool] | None,
        trace_id: int,
    ) -> bytes:
        assert self.ctx.tracing is not None
        host = fields.host
        exchange.span, traceparent = self.ctx.tracing.start(
            parent,
            trace_id,
            fields.tracestate,
            exchange.method,
            exchange.target,
            {
                "shardgate.kind": "write" if exchange.is_write else "read",
                "shardgate.epoch": topology.epoch,
                "shardgate.request_id": exchange.rid.decode("latin-1"),
                "client.address": self.peer.decode("latin-1"),
                "server.address": host.decode("latin-1") if host else "",
                "network.protocol.version": "1.0" if exchange.http10 else "1.1",
            },
        )
        exchange.traceparent = traceparent
        return traceparent

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        if exchange.body_bytes + len(body) > self.ctx.limits.max_body_bytes:
            self._protocol_error(BODY_TOO_LARGE)
            raise _ParseAbort
        exchange.add_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        exchange.body_complete()
        self.deadline = 0.0  # a response is owed now; the upstream's deadline applies

    # -- driving exchanges ---------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the oldest unanswered exchange, or hand its body read so far upstream."""
        exchanges = self.exchanges
        while exchanges and not self.closed:
            exchange = exchanges[0]
            if exchange.state == QUEUED:
                exchange.start()
                if exchange.state == DONE:
                    continue  # refused (and answered, or the connection closed): the next one
            else:
                exchange.flush_body()
            break
        self.update_reading()

    def resume(self, exchange: Exchange) -> None:
        """``exchange`` waited for an answer from outside (its rate limit, asked in Redis) and
        may go on: started now if it is its turn."""
        if self.exchanges and self.exchanges[0] is exchange:
            self._advance()

    def update_reading(self) -> None:
        """Hold reading back while a request waits for an earlier one, or while too much of a
        body is buffered with no upstream connection to take it."""
        exchanges = self.exchanges
        flow = self.flow
        if self.closed or (not flow.read_blocks and len(exchanges) < 2 and not self._buffering()):
            return  # the usual case: reading, one request at a time, nothing piling up
        flow.set_block(PIPELINE, len(exchanges) > 1)
        flow.set_block(PENDING, self._buffering())

    def _buffering(self) -> bool:
        """Too much body is buffered for an exchange still waiting for its upstream connection."""
        active = self.exchanges[0] if self.exchanges else None
        return active is not None and active.upstream is None and active.pending_bytes > PENDING_LIMIT

    def upstream_full(self, full: bool) -> None:
        self.flow.set_block(UPSTREAM_FULL, full)

    # -- answering -------------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        if not self.closed:
            self.ctx.metrics.bytes_sent += len(data)
            self.transport.write(data)  # type: ignore[union-attr]

    def refuse(self, exchange: Exchange, refusal: Refusal) -> None:
        """Answer an exchange that got no upstream response with the contract's error."""
        if self.closed or exchange.state == DONE:
            return
        ctx = self.ctx
        ctx.metrics.refused(refusal.code)
        exchange.state = DONE
        exchange.error = refusal.code
        exchange.status = refusal.status
        exchange.release()
        upstream, exchange.upstream = exchange.upstream, None
        if upstream is not None:
            upstream.abort()
        close = not exchange.keep_alive or not exchange.request_done or ctx.draining or ctx.closing
        exchange.keep_alive = not close
        self.send(
            error_response(
                refusal.status,
                refusal.code,
                refusal.detail,
                exchange.rid,
                close=close,
                retry_after=refusal.retry_after,
                group=refusal.group,
                headers=refusal.headers,
            )
        )
        self.exchange_done(exchange, ctx.loop.time())

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        """The response is complete: account for it, then close or move to the next request."""
        exchange.release()
        ctx = self.ctx
        record(ctx, exchange, exchange.status, now, self.peer)
        exchanges = self.exchanges
        if exchanges and exchanges[0] is exchange:
            del exchanges[0]
        self.flow.unblock_reading(UPSTREAM_FULL)
        if not exchange.keep_alive:  # the response said "Connection: close"
            self._close()
        elif exchanges:
            self._advance()  # (after the drain delay, answered not_ready)
        elif ctx.draining and self.parsing is None:
            self._close()  # idle past the drain delay: nothing more is served here
        else:
            self.update_reading()
            if self.parsing is None:
                self.deadline = now + ctx.limits.client_idle_timeout

    def abort(self, exchange: Exchange) -> None:
        """A response already under way cannot be completed: cut the client off, never fake it."""
        exchange.release()
        exchange.state = DONE
        upstream, exchange.upstream = exchange.upstream, None
        if upstream is not None:
            upstream.abort()
        record(self.ctx, exchange, 502, self.ctx.loop.time(), self.peer)
        self.closed = self.flow.stopped = True
        if self.transport is not None:
            self.transport.abort()

    # -- deadlines, errors, closing ----------------------------------------------------------

    def on_deadline(self, now: float) -> None:
        self.deadline = 0.0
        active = self.exchanges[0] if self.exchanges else None
        if active is None:
            self._close()
        elif active.state != STREAMING:
            self.abort(active)
        # (streaming a response: the client reads at its pace; the upstream's deadline applies)

    def close_if_idle(self) -> None:
        if not self.exchanges and self.parsing is None:
            self._close()

    def _protocol_error(self, refusal: Refusal) -> None:
        """Bad input: answer it after the requests before it, then close the connection."""
        if self.closed:
            return
        exchange = self.parsing
        self.parsing = None
        self._reading_head = False
        self._stop_reading()
        if exchange is not None and exchange.started:
            # The request being proxied turned bad mid-body (bad chunk, over the size limit).
            exchange.keep_alive = False
            if exchange.answered:
                self.abort(exchange)
            else:
                self.refuse(exchange, refusal)
            return
        if exchange is None:
            exchange = Exchange(self, self.ctx.loop.time())
        if exchange not in self.exchanges:
            self.exchanges.append(exchange)
        exchange.state = QUEUED
        if not exchange.rid:
            exchange.rid = next(self.ctx.next_id)
        exchange.keep_alive = False
        exchange.take_pending()
        exchange.refusal = refusal

    def _internal_error(self, exc: BaseException) -> None:
        """A bug of ours while handling a request: logged with its traceback, answered 500 (or,
        if its response is under way, cut off), and the connection closes."""
        log.error("internal error while handling a request", exc_info=(type(exc), exc, exc.__traceback__))
        if self.parsing is not None or not self.exchanges:
            self._protocol_error(INTERNAL_ERROR)  # the request being read is refused
        else:
            self._stop_reading()
            active = self.exchanges[0]
            active.keep_alive = False
            if active.answered:
                self.abort(active)
            else:
                self.refuse(active, INTERNAL_ERROR)
        if not self.closed:
            self._advance()

    def _stop_reading(self) -> None:
        self.flow.block_reading(BROKEN)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = self.flow.stopped = True
        self.deadline = 0.0
        if self.transport is not None:
            self.transport.close()


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
