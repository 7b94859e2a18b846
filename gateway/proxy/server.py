"""Client side of the data plane: one ``ClientConnection`` per accepted socket.

Connection state (parser, queue of pipelined exchanges, flow control, deadline) lives on
``ClientConnection``; request state lives on ``Exchange``. Requests are parsed with llhttp
(httptools); the request head is rewritten once, the body is forwarded with its original
framing. Exchanges are answered strictly in order: a pipelined request waits (its body
buffered, reading paused) until the one before it has been answered.

Write safety (DESIGN invariants 1 and 4): a write's candidate pods are only its owner group's;
a request is tried on a second pod only when no byte of it was handed to the first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set as AbstractSet
from typing import Any

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway.observability.tracing import parse_traceparent
from gateway.proxy.context import (
    BLOCK_BROKEN,
    BLOCK_PENDING,
    BLOCK_PIPELINE,
    BLOCK_UPSTREAM,
    ProxyContext,
)
from gateway.proxy.http import (
    CONNECTION_OPTIONS,
    CONTINUE_RESPONSE,
    HOP_BY_HOP,
    LAST_CHUNK,
    SHARD_PREFIX,
    VIA_TOKEN,
    RequestIds,
    error_response,
    valid_host,
    valid_request_id,
)
from gateway.proxy.upstream import UpstreamConnection, acquire_idle, open_connection
from gateway.router import REPEATED_KEY, Decision, Refusal, choose_pod, decide, is_write
from gateway.topology import Pod, PodState, Topology

log = logging.getLogger("shardgate.proxy")

PENDING_LIMIT = 256 * 1024
CLIENT_CLOSED = 499  # nginx's code for "client went away", used in metrics only

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
BAD_HOST = Refusal(400, "bad_request", "an HTTP/1.1 request needs exactly one valid Host field")
# After the drain delay nothing new is forwarded (the contract's not_ready, "draining").
DRAINED = Refusal(503, "not_ready", "the gateway is shutting down; retry on another replica", retry_after=1)


class _ParseAbort(Exception):
    """Raised inside a parser callback to stop parsing; the connection answers and closes."""


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "attempts",
        "body_bytes",
        "chunked",
        "client",
        "decision",
        "error",
        "expect_continue",
        "head",
        "http10",
        "idempotent",
        "is_head",
        "is_write",
        "keep_alive",
        "method",
        "pending",
        "pending_bytes",
        "pod",
        "refusal",
        "request_done",
        "response_done",
        "rid",
        "sent",
        "served_by",
        "span",
        "start_time",
        "started",
        "status",
        "target",
        "traceparent",
        "upstream",
    )

    def __init__(self, client: ClientConnection, start_time: float) -> None:
        self.client = client
        self.start_time = start_time
        self.decision: Decision | None = None
        self.refusal: Refusal | None = None  # set when the gateway answers this request itself
        self.error: str | None = None  # the error code the gateway answered with, if any
        self.head = b""
        self.rid = b""
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.body_bytes = 0
        self.chunked = False
        self.keep_alive = True
        self.http10 = False
        self.is_head = False
        self.is_write = False  # known even when the request is refused (for metrics and logs)
        self.idempotent = False
        self.expect_continue = False
        self.request_done = False
        self.started = False
        self.sent = False  # some byte of this request was handed to an upstream connection
        self.response_done = False
        self.status = 0
        self.attempts = 0
        self.pod: Pod | None = None
        self.served_by: Pod | None = None  # the last pod tried (kept for metrics, logs, spans)
        self.upstream: UpstreamConnection | None = None
        self.method = b""
        self.target = b""
        self.traceparent: bytes | None = None  # as sent upstream (the client's, or our span's)
        self.span: Any = None  # an OpenTelemetry span when this request is sampled

    # -- called by the upstream connection (which completes an answered exchange itself) ----

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed under this exchange."""
        self.upstream = None
        client = self.client
        if self.response_done:
            return
        if self.status:
            if conn.until_close:
                # Close-delimited body: the close *is* the end of the response.
                self.response_done = True
                self.keep_alive = False
                client.exchange_done(self)
            else:
                client.abort_exchange(self)  # the client must see a truncated response
            return
        if self._may_retry(conn):
            client.ctx.metrics.upstream_retries += 1
            self._try_again(exclude=None if conn.reused else self.pod)
            return
        client.fail(self, 502, "upstream_error", "upstream closed the connection before responding")

    def upstream_invalid(self, conn: UpstreamConnection) -> None:
        conn.abort()
        self.upstream = None
        if self.status:
            self.client.abort_exchange(self)
        else:
            self.client.fail(self, 502, "upstream_error", "upstream sent an invalid response")

    def upstream_timeout(self, conn: UpstreamConnection) -> None:
        conn.abort()
        self.upstream = None
        if self.status:
            self.client.abort_exchange(self)
        else:
            self.client.fail(self, 504, "upstream_timeout", "upstream did not answer in time")

    # -- retry rules ------------------------------------------------------------------------

    def _may_retry(self, conn: UpstreamConnection) -> bool:
        if self.attempts >= 2 or not self.request_done:
            return False
        if not self.sent:
            return True
        # Bytes were handed to the upstream: only a bodiless idempotent read may go again
        # (its whole request is the head, which is kept). A write never does, whatever its
        # method: GET + "Operation-Type: write" is a write (DESIGN invariant 4).
        return not self.is_write and self.idempotent and self.body_bytes == 0 and not self.chunked

    def _try_again(self, exclude: Pod | None) -> None:
        self._leave_pod()
        self.sent = False
        self.client.dispatch(self, exclude)
        self.client._update_blocks()

    def _leave_pod(self) -> None:
        if self.pod is not None:
            self.pod.inflight -= 1
            self.pod = None


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_fresh_read",
        "_header_bytes",
        "_headers",
        "_reading_head",
        "_url",
        "broken",
        "closed",
        "ctx",
        "deadline",
        "exchanges",
        "out",
        "parser",
        "parsing",
        "peer",
        "read_blocks",
        "transport",
        "write_paused",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        # Requests answered in order (pipelining). A list, not a deque: it is rarely longer than
        # one, and an empty list is 56 bytes against 600 (x 10,000 idle connections).
        self.exchanges: list[Exchange] = []
        self.parsing: Exchange | None = None
        self.out: list[bytes | memoryview] = []
        self.read_blocks = 0
        self.write_paused = False
        self.closed = False
        self.broken = False  # nothing more is read: a protocol error or an upgrade was seen
        self.deadline = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._url = b""
        self._header_bytes = 0
        self._reading_head = False
        self._fresh_read: bytes | None = None  # this read, when a request head begins at its start

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses; they implement the same API.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        ctx = self.ctx
        ctx.clients.add(self)
        ctx.metrics.client_connections_open += 1
        ctx.metrics.client_connections_total += 1
        self.deadline = ctx.loop.time() + ctx.limits.client_header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = 0.0
        ctx = self.ctx
        ctx.clients.discard(self)
        ctx.metrics.client_connections_open -= 1
        exchanges = list(self.exchanges)
        self.exchanges.clear()
        for exchange in exchanges:
            exchange._leave_pod()
            conn = exchange.upstream
            if conn is not None:
                exchange.upstream = None
                conn.abort()  # mid-exchange: its response can no longer be delivered
            if exchange.started and not exchange.response_done:
                self._record(exchange, CLIENT_CLOSED)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchanges and self.exchanges[0].upstream is not None:
            self.exchanges[0].upstream.set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchanges and self.exchanges[0].upstream is not None:
            self.exchanges[0].upstream.set_reading(True)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        self.ctx.metrics.bytes_received += len(data)
        if self._reading_head:
            self._header_bytes += len(data)
            self._fresh_read = None
        elif self.parsing is not None:
            # Body in progress: a client that stalls mid-body is cut off after the idle timeout.
            self.deadline = self.ctx.loop.time() + self.ctx.limits.client_idle_timeout
            self._fresh_read = None
        else:
            self._fresh_read = data  # between requests: the next one begins with these bytes
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # Upgrade is not supported: the request goes out without its Upgrade header, and
            # what follows it on this connection is not HTTP/1.1 we could parse.
            if self.exchanges:
                self.exchanges[-1].keep_alive = False
            self._stop_reading()
        except HttpParserCallbackError as exc:
            # httptools wraps what a callback raised; the original is its __context__.
            if not isinstance(exc.__context__, _ParseAbort):  # (a _ParseAbort was answered)
                self._internal_error(exc.__context__ or exc)
        except HttpParserError as exc:
            self._protocol_error(400, "bad_request", f"malformed HTTP request: {_reason(exc)}")
        else:
            if self._reading_head:  # a head is incomplete: is what came of it over the limit?
                if self._header_bytes < 0:  # it began in this read: count its fields so far
                    self._header_bytes = _head_size(self._url, self._headers)
                if self._header_bytes > self.ctx.limits.max_header_bytes:
                    self._protocol_error(431, "headers_too_large", "request headers are too large")
            elif self.parsing is not None:
                # A body is still to come (its head was complete): the idle timeout applies.
                self.deadline = self.ctx.loop.time() + self.ctx.limits.client_idle_timeout
        self._advance()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if self._reading_head:
            self._url += url  # the rest of a target that arrived in pieces
            return
        # A request begins: its target is llhttp's first callback for it (an on_message_begin
        # would be one more Python call per request).
        ctx = self.ctx
        now = ctx.loop.time()
        self.parsing = Exchange(self, now)
        self._headers = []
        self._url = url
        self._header_bytes = -1  # not counted: a head that arrives whole is measured once
        self._reading_head = True
        self.deadline = now + ctx.limits.client_header_timeout

    def on_header(self, name: bytes, value: bytes) -> None:
        # Nothing but the append: the head's size is checked once it is complete (or at the
        # end of a read that left it incomplete), not per field.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._reading_head = False
        exchange = self.parsing
        assert exchange is not None
        self.exchanges.append(exchange)
        ctx = self.ctx
        method = self.parser.get_method()
        exchange.is_head = method == b"HEAD"
        exchange.idempotent = method in _IDEMPOTENT
        # The head is complete: read its fields, decide the route, build the upstream head
        # (here rather than in a method of its own: one Python call less per request).
        topology = ctx.holder.current
        actions = topology.header_actions if topology is not None else _NO_TOPOLOGY_ACTIONS
        raw_key = operation = request_id = forwarded_for = via = host = traceparent = tracestate = None
        has_proto = has_forwarded_host = key_repeated = host_repeated = saw_connection = False
        content_length = -1
        connection_tokens: set[bytes] | None = None
        headers = self._headers
        limit_digits = ctx.body_limit_digits
        rewritten = False  # some field is dropped or replaced (most requests: none)
        for name, value in headers:
            action = actions.get(name)
            if action is None:
                action = _classify_header(name.lower(), topology)
                if len(actions) < _ACTION_CACHE_SIZE:  # a cache of spellings seen, bounded
                    actions[name] = action
            # The common fields first: most requests carry nothing but these.
            if action == _FORWARD:
                continue
            if action == _KEY:
                if raw_key is not None:
                    # Two key headers: a backend reading the other one would write a key
                    # this group does not own. Refused, never guessed.
                    key_repeated = True
                raw_key = value
                continue
            if action == _HOST:
                host_repeated = host is not None
                host = value
                continue
            if action == _CONTENT_LENGTH:
                # Only compared with the body limit: a shorter number is below it anyway.
                if len(value) >= limit_digits:
                    content_length = int(value) if value.isdigit() else -1
                continue
            if action in _FORWARDED_ACTIONS:
                if action == _FORWARDED_PROTO:
                    has_proto = True
                elif action == _FORWARDED_HOST:
                    has_forwarded_host = True
                elif action == _OPERATION:
                    operation = value
                elif action == _TRACESTATE:
                    tracestate = value
                elif action == _TRANSFER_ENCODING:
                    exchange.chunked = True
                continue
            rewritten = True  # from here on: fields not forwarded as they came
            if action == _CONNECTION:
                saw_connection = True
                tokens = {t.strip().lower() for t in value.split(b",")} - CONNECTION_OPTIONS
                if tokens:
                    connection_tokens = (connection_tokens or set()) | tokens
            elif action == _REQUEST_ID:
                request_id = value
            elif action == _FORWARDED_FOR:
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif action == _TRACEPARENT:
                traceparent = value  # re-added below: ours when this request is traced
            elif action == _VIA:
                via = value if via is None else via + b", " + value
            elif action == _EXPECT:
                if value.strip().lower() == b"100-continue":
                    exchange.expect_continue = True  # the gateway answers Expect itself
            # else _DROP: hop-by-hop, or X-Shard-* (only the gateway speaks those upstream)
        # The "Name: value\r\n" lines that go upstream as they came, and the size the header
        # limit counts (the target and request line too, for a head that came in pieces: see
        # data_received).
        fresh = self._fresh_read
        self._fresh_read = None  # a second head in the same read (pipelining) starts elsewhere
        if rewritten:
            size = _head_size(b"", headers)
            forwarded = _field_lines(_forwarded_fields(headers, topology, connection_tokens or _NO_NAMES))
        elif fresh is not None:
            # The head came whole in this read: its field lines are sliced out rather than
            # rebuilt. They are what llhttp accepted (CRLF line ends, no folding, no bare CR:
            # it refuses anything else), so the request line ends at the first CRLF after the
            # empty lines llhttp skips before it (RFC 9112 2.2), and the fields at the first
            # blank line after that.
            line_end = fresh.find(b"\r\n", _request_line_start(fresh))
            forwarded = fresh[line_end + 2 : fresh.find(b"\r\n\r\n", line_end) + 2]
            size = len(forwarded)
        else:
            forwarded = _field_lines(headers)
            size = len(forwarded)
        if size > ctx.limits.max_header_bytes:
            self._protocol_error(431, "headers_too_large", "request headers are too large")
            raise _ParseAbort
        parser = self.parser
        exchange.keep_alive = keep_alive = parser.should_keep_alive()
        # Keep-alive without a Connection field means HTTP/1.1 or later (1.0 needs
        # "Connection: keep-alive"), so the version is asked for (a str.format in httptools)
        # only when a Connection field was sent or the connection is to close.
        exchange.http10 = (not keep_alive or saw_connection) and parser.get_http_version() == "1.0"

        if (
            host_repeated
            or (host is None and parser.get_http_version() != "1.0")
            or (host is not None and not valid_host(host))
        ):
            # RFC 9112 3.2: an HTTP/1.1 request needs one Host field, of a valid value (and no
            # request may carry two). Malformed: answered 400, and the connection closes.
            exchange.refusal = BAD_HOST
            exchange.keep_alive = False
        if not valid_request_id(request_id):
            request_id = next(ctx.next_id)
        exchange.rid = request_id
        exchange.method = method
        exchange.target = self._url
        exchange.traceparent = traceparent

        if exchange.refusal is not None:
            exchange.is_write = topology is not None and is_write(topology, method, operation)
            return
        decision = decide(topology, method, raw_key, operation) if not key_repeated else REPEATED_KEY
        if isinstance(decision, Refusal):
            exchange.is_write = topology is not None and is_write(topology, method, operation)
            exchange.refusal = decision
            return
        exchange.is_write = decision.is_write
        if content_length > ctx.limits.max_body_bytes:
            exchange.refusal = Refusal(413, "body_too_large", "request body is larger than allowed")
            exchange.keep_alive = False
            return
        assert topology is not None
        exchange.decision = decision
        peer = self.peer
        extra = b"" if has_proto else b"X-Forwarded-Proto: http\r\n"
        if not has_forwarded_host and host is not None:
            extra += b"X-Forwarded-Host: " + host + b"\r\n"
        tracing = ctx.tracing
        if tracing is not None:
            parent = parse_traceparent(traceparent) if traceparent is not None else None
            trace_id = tracing.sampled_trace_id(parent)
            if trace_id:
                exchange.span, traceparent = tracing.start(
                    parent,
                    trace_id,
                    tracestate,
                    method,
                    self._url,
                    {
                        "shardgate.kind": "write" if decision.is_write else "read",
                        "shardgate.epoch": topology.epoch,
                        "shardgate.request_id": request_id.decode("latin-1"),
                        "client.address": peer.decode("latin-1"),
                        "server.address": host.decode("latin-1") if host else "",
                        "network.protocol.version": "1.0" if exchange.http10 else "1.1",
                    },
                )
                exchange.traceparent = traceparent
        tail = b"" if traceparent is None else b"traceparent: " + traceparent + b"\r\n"
        if exchange.http10:
            # Asking in HTTP/1.0 means the upstream cannot answer chunked, which such a
            # client could not read; keep-alive is still requested for the pool's sake.
            tail += b"Connection: keep-alive\r\n"
        # The whole head in one join (cheaper than %-formatting). X-Shard-Group and the blank
        # line are added per attempt: a read's group is its pod's.
        exchange.head = b"".join(
            (
                method,
                b" ",
                self._url,
                b" HTTP/1.0\r\n" if exchange.http10 else b" HTTP/1.1\r\n",
                forwarded,
                b"X-Request-ID: ",
                request_id,
                b"\r\nX-Forwarded-For: ",
                forwarded_for + b", " + peer if forwarded_for else peer,
                b"\r\n",
                extra,
                b"Via: ",
                via + b", " + VIA_TOKEN if via else VIA_TOKEN,
                b"\r\nX-Shard-Epoch: ",
                topology.epoch_bytes,
                b"\r\n",
                tail,
            )
        )

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.body_bytes += len(body)
        if exchange.body_bytes > self.ctx.limits.max_body_bytes:
            self._protocol_error(413, "body_too_large", "request body is larger than allowed")
            raise _ParseAbort
        if exchange.refusal is not None:
            return  # refused already; the body is read and dropped to keep the connection usable
        exchange.pending.append(b"%x\r\n%s\r\n" % (len(body), body) if exchange.chunked else body)
        exchange.pending_bytes += len(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        exchange.request_done = True
        if exchange.chunked and exchange.refusal is None:
            exchange.pending.append(LAST_CHUNK)
        self.deadline = 0.0  # a response is owed now; the upstream's deadline applies

    # -- driving exchanges ---------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the oldest unanswered exchange and push its buffered body upstream."""
        while self.exchanges and not self.closed:
            exchange = self.exchanges[0]
            if not exchange.started:
                exchange.started = True
                refusal = exchange.refusal
                if refusal is None and self.ctx.draining:
                    refusal = DRAINED  # arrived, or waited its turn, past the drain delay
                if refusal is not None:
                    self.fail(exchange, refusal.status, refusal.code, refusal.detail, refusal.retry_after,
                              refusal.group)  # fmt: skip
                    continue  # it finished (or closed the connection); look at the next
                if exchange.expect_continue and not exchange.request_done:
                    self.out.append(CONTINUE_RESPONSE)
                    self.flush_output()
                self.dispatch(exchange, None)
            elif exchange.pending and exchange.upstream is not None:
                exchange.upstream.transport.write(b"".join(exchange.pending))  # type: ignore[union-attr]
                exchange.pending.clear()
                exchange.pending_bytes = 0
            break
        exchanges = self.exchanges
        if self.read_blocks or len(exchanges) > 1 or (exchanges and exchanges[0].pending_bytes):
            self._update_blocks()  # (the common case needs nothing: checked here, without a call)

    def _update_blocks(self) -> None:
        exchanges = self.exchanges
        if (
            not self.read_blocks
            and len(exchanges) <= 1
            and (not exchanges or exchanges[0].pending_bytes == 0)
        ):
            return  # the common case: reading, one request at a time, nothing buffered
        if self.closed:
            return
        if len(exchanges) > 1:
            self.block_reading(BLOCK_PIPELINE)
        else:
            self.unblock_reading(BLOCK_PIPELINE)
        active = self.exchanges[0] if self.exchanges else None
        if active is not None and active.upstream is None and active.pending_bytes > PENDING_LIMIT:
            self.block_reading(BLOCK_PENDING)
        else:
            self.unblock_reading(BLOCK_PENDING)

    def dispatch(self, exchange: Exchange, exclude: Pod | None) -> None:
        """Pick a pod from the exchange's allowed set and send the request to it."""
        decision = exchange.decision
        assert decision is not None
        exchange.attempts += 1
        pod = choose_pod(decision.candidates, exclude)
        if pod is None and exclude is not None and exclude.state is PodState.READY:
            pod = exclude  # a one-pod group: a fresh connection to the same pod is the retry
        if pod is None:
            group = decision.group
            detail = f"shard group {group} has no ready pod" if group else "no ready pod"
            self.fail(exchange, 503, "shard_unavailable", detail, retry_after=1, group=group)
            return
        pod.inflight += 1
        pod.requests += 1
        exchange.pod = exchange.served_by = pod
        now = self.ctx.loop.time()
        conn = acquire_idle(pod, now)
        if conn is not None:
            conn.start(exchange, now)
        else:
            self.ctx.loop.create_task(self._connect_and_send(exchange, pod))

    async def _connect_and_send(self, exchange: Exchange, pod: Pod) -> None:
        ctx = self.ctx
        try:
            conn = await open_connection(ctx, pod)
        except (OSError, TimeoutError) as exc:
            ctx.metrics.upstream_connect_failures += 1
            if self.closed or exchange.pod is not pod:
                return
            if exchange.attempts < 2:
                # Nothing reached the pod (the body is still in ``pending``): safe to try another.
                ctx.metrics.upstream_retries += 1
                exchange._leave_pod()
                self.dispatch(exchange, pod)
                self._update_blocks()
                return
            timeout = isinstance(exc, TimeoutError)
            self.fail(
                exchange,
                504 if timeout else 502,
                "upstream_timeout" if timeout else "upstream_error",
                f"could not connect to a pod of group {pod.group}",
            )
            return
        if self.closed or exchange.pod is not pod or exchange.response_done:
            conn.close()  # opened for a request that is gone (rare): not worth pooling
            return
        conn.start(exchange, ctx.loop.time())
        self._update_blocks()

    def fail(
        self,
        exchange: Exchange,
        status: int,
        code: str,
        detail: str,
        retry_after: int | None = None,
        group: str | None = None,
    ) -> None:
        """Answer an exchange that got no upstream response with the contract's error."""
        if self.closed or exchange.response_done:
            return
        self.ctx.metrics.refused(code)
        exchange.error = code
        exchange._leave_pod()
        exchange.status = status
        exchange.response_done = True
        if exchange.upstream is not None:
            exchange.upstream.abort()
            exchange.upstream = None
        close = not exchange.keep_alive or not exchange.request_done or self.ctx.draining or self.ctx.closing
        exchange.keep_alive = not close
        self.out.append(
            error_response(
                status, code, detail, exchange.rid, close=close, retry_after=retry_after, group=group
            )
        )
        self.exchange_done(exchange)

    def exchange_done(self, exchange: Exchange, now: float | None = None) -> None:
        """The response is complete: account for it, then close or move to the next request."""
        pod = exchange.pod
        if pod is not None:  # exchange._leave_pod(), inlined
            pod.inflight -= 1
            exchange.pod = None
        ctx = self.ctx
        if now is None:
            now = ctx.loop.time()
        self._record(exchange, exchange.status, now)
        exchanges = self.exchanges
        if exchanges and exchanges[0] is exchange:
            del exchanges[0]
        if self.read_blocks & BLOCK_UPSTREAM:
            self.unblock_reading(BLOCK_UPSTREAM)
        if self.out:
            self.flush_output()
        if not exchange.keep_alive:  # the response said "Connection: close"
            self._close()
            return
        if exchanges:
            self._advance()  # (after the drain delay, answered not_ready)
        elif ctx.draining and self.parsing is None:
            self._close()  # idle past the drain delay: nothing more is served here
        else:
            if self.read_blocks:
                self._update_blocks()
            if self.parsing is None:
                self.deadline = now + ctx.limits.client_idle_timeout

    def abort_exchange(self, exchange: Exchange) -> None:
        """A response already under way cannot be completed: cut the client off, never fake it."""
        exchange._leave_pod()
        exchange.response_done = True
        if exchange.upstream is not None:
            exchange.upstream.abort()
            exchange.upstream = None
        self._record(exchange, 502)
        self.flush_output()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _record(self, exchange: Exchange, status: int, now: float | None = None) -> None:
        decision = exchange.decision
        group = decision.group if decision is not None else None
        if not group:  # a read: its group is its pod's
            pod = exchange.served_by
            group = pod.group if pod is not None else "none"
        ctx = self.ctx
        seconds = (ctx.loop.time() if now is None else now) - exchange.start_time
        metrics = ctx.metrics
        stats = (metrics.write_routes if exchange.is_write else metrics.read_routes).get(group)
        if stats is None:
            stats = metrics.route(group, exchange.is_write)
        stats.observe(status, seconds)
        if exchange.span is not None:
            pod = exchange.served_by
            ctx.tracing.finish(  # type: ignore[union-attr]
                exchange.span,
                status,
                {"shardgate.group": group, "shardgate.pod": pod.address if pod else ""},
            )
            exchange.span = None
        access = ctx.access_log
        if access.enabled and (status >= 500 or seconds >= access.slow or access.sampling):
            if access.wants(status, seconds):
                self._access_log(exchange, status, seconds, group)

    def _access_log(self, exchange: Exchange, status: int, seconds: float, group: str) -> None:
        topology = self.ctx.holder.current
        traceparent = exchange.traceparent
        pod = exchange.served_by
        self.ctx.access_log.log(
            {
                "request_id": exchange.rid.decode("latin-1"),
                "trace_id": traceparent[3:35].decode("latin-1") if traceparent else None,
                "method": exchange.method.decode("latin-1"),
                "path": exchange.target.split(b"?", 1)[0].decode("latin-1"),
                "status": status,
                "kind": "write" if exchange.is_write else "read",
                "group": group,
                "pod": pod.address if pod else None,
                "epoch": topology.epoch if topology else None,
                "duration_ms": round(seconds * 1000, 3),
                "client": self.peer.decode("latin-1"),
                "error": exchange.error,
            }
        )

    # -- output, flow control, closing ---------------------------------------------------------

    def flush_output(self) -> None:
        out = self.out
        if out and not self.closed:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.ctx.metrics.bytes_sent += len(data)
            self.transport.write(data)  # type: ignore[union-attr]
            out.clear()

    def block_reading(self, reason: int) -> None:
        if not self.read_blocks and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.read_blocks |= reason

    def unblock_reading(self, reason: int) -> None:
        if self.read_blocks & reason:
            self.read_blocks &= ~reason
            if not self.read_blocks and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def on_deadline(self, now: float) -> None:
        active = self.exchanges[0] if self.exchanges else None
        if active is not None and active.upstream is not None and active.status:
            self.deadline = 0.0  # streaming a response; the client is reading at its pace
            return
        self.deadline = 0.0
        if active is not None:
            self.abort_exchange(active)
        else:
            self._close()

    def close_if_idle(self) -> None:
        if not self.exchanges and self.parsing is None:
            self._close()

    def _protocol_error(self, status: int, code: str, detail: str) -> None:
        """Malformed input: answer it after the requests before it, then close the connection."""
        if self.closed:
            return
        exchange = self.parsing
        self.parsing = None
        self._reading_head = False
        self._stop_reading()
        if exchange is not None and exchange.started:
            # The request being proxied turned bad mid-body (bad chunk, over the size limit).
            exchange.keep_alive = False
            if exchange.status:
                self.abort_exchange(exchange)
            else:
                self.fail(exchange, status, code, detail)
            return
        if exchange is None:
            exchange = Exchange(self, self.ctx.loop.time())
        if exchange not in self.exchanges:
            self.exchanges.append(exchange)
        if not exchange.rid:
            exchange.rid = next(self.ctx.next_id)
        exchange.keep_alive = False
        exchange.pending.clear()
        exchange.refusal = Refusal(status, code, detail)

    def _internal_error(self, exc: BaseException) -> None:
        """A bug of ours while reading a request: logged with its traceback, answered 500."""
        log.error("internal error while reading a request", exc_info=(type(exc), exc, exc.__traceback__))
        self._protocol_error(500, "internal_error", "the gateway failed to handle this request")

    def _stop_reading(self) -> None:
        self.broken = True
        self.block_reading(BLOCK_BROKEN)

    def _close(self) -> None:
        if self.closed:
            return
        self.flush_output()
        self.closed = True
        self.deadline = 0.0
        if self.transport is not None:
            self.transport.close()


# What on_headers_complete does with a request header, by its (lower-case) name.
(
    _FORWARD,
    _DROP,
    _KEY,
    _CONNECTION,
    _REQUEST_ID,
    _FORWARDED_FOR,
    _FORWARDED_PROTO,
    _FORWARDED_HOST,
    _OPERATION,
    _HOST,
    _TRACEPARENT,
    _TRACESTATE,
    _VIA,
    _EXPECT,
    _CONTENT_LENGTH,
    _TRANSFER_ENCODING,
) = range(16)
_ACTION_CACHE_SIZE = 1024
_NAMED_ACTIONS = {
    b"x-request-id": _REQUEST_ID,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"x-forwarded-proto": _FORWARDED_PROTO,
    b"x-forwarded-host": _FORWARDED_HOST,
    b"host": _HOST,
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
    b"via": _VIA,
    b"expect": _EXPECT,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
}
_NO_TOPOLOGY_ACTIONS: dict[bytes, int] = {}
# Fields forwarded as they came, though the gateway reads them.
_FORWARDED_ACTIONS = frozenset(
    {_FORWARD, _KEY, _HOST, _CONTENT_LENGTH, _FORWARDED_PROTO, _FORWARDED_HOST, _OPERATION, _TRACESTATE,
     _TRANSFER_ENCODING}
)  # fmt: skip
_NO_NAMES: frozenset[bytes] = frozenset()


def _forwarded_fields(
    headers: list[tuple[bytes, bytes]], topology: Topology | None, named: AbstractSet[bytes]
) -> list[tuple[bytes, bytes]]:
    """The fields of a request that go upstream as they came: not hop-by-hop (nor named
    hop-by-hop by its Connection field), not X-Shard-*, not one the gateway replaces."""
    return [
        (name, value)
        for name, value in headers
        if _classify_header(lname := name.lower(), topology) in _FORWARDED_ACTIONS and lname not in named
    ]


def _field_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Fields as "Name: value\\r\\n" lines."""
    return b"".join([b"%s: %s\r\n" % field for field in headers])


def _head_size(target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of a request head so far, as the header limit counts them."""
    return len(target) + sum(len(name) + len(value) + 4 for name, value in headers)


def _classify_header(lname: bytes, topology: Topology | None) -> int:
    """The action for a header name; cached per raw spelling in the topology snapshot, since
    which header is the shard key (or the operation header) depends on the config."""
    if topology is not None and lname == topology.key_header:
        return _KEY
    if lname in HOP_BY_HOP:
        return _CONNECTION if lname == b"connection" else _DROP
    if lname.startswith(SHARD_PREFIX):
        return _DROP
    if topology is not None and lname == topology.operation_header:
        return _OPERATION
    return _NAMED_ACTIONS.get(lname, _FORWARD)


def _request_line_start(data: bytes) -> int:
    """Where the request line begins in a read that begins a request: after the CR, LF and
    CRLF that a server may skip before it (RFC 9112 2.2; llhttp does)."""
    return len(data) - len(data.lstrip(b"\r\n"))


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
