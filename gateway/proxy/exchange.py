"""One request and its response: the state it is in, the pod it is bound to, and its retries.

An ``Exchange`` is created when a request head begins and lives until its response is complete
(or given up). Its life is one explicit state:

    PARSING -> QUEUED -> CONNECTING -> SENT -> STREAMING -> DONE
                  \\________________________________________/  (refused: QUEUED -> DONE)
                  ^______________________________/  (a fence's 421: SENT -> QUEUED, held or
                                                      sent on to another group, once)

It alone decides whether it may be tried again (``may_retry``): before any byte reached a pod,
always once; after that, only a bodiless idempotent read, never a write (DESIGN invariant 4) --
but for the one case where the pod itself guarantees its handler did not run: a fenced pod's
``421`` (``X-Shard-Fence``, docs/design/014-ownership-handoff.md), which is never passed on. The
write goes once more, only to an owner other than the refusing group in the gateway's newest
view (held up to ``handoff.hold_seconds`` for a view that names one), or is answered
``503 shard_moving``.
``bind``/``release`` are the one place a request is tied to a pod (its in-flight count).

The upstream connection talks to it through the ``ResponseSink`` methods (response head, body,
completion, failures); the exchange decides what the client is told and hands the bytes to its
client connection through the small ``ClientSide`` interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.proxy.health import CONNECT_FAILURE, CONNECT_TIMEOUT, RESET, TIMEOUT
from gateway.proxy.response_head import (
    Dechunker,
    Framing,
    connection_field,
    finish_head,
    without_transfer_encoding,
)
from gateway.proxy.retries import RETRIABLE_STATUSES
from gateway.proxy.sides import ClientSide, ResponseSink
from gateway.router import NOT_READY, Decision, Refusal, choose_pod, decide, moving_to
from gateway.topology import Handoff, Pod

if TYPE_CHECKING:
    from gateway.proxy.pool import PodLink
    from gateway.proxy.upstream import UpstreamConnection

# The states of an exchange.
PARSING = 0  # its head is arriving
QUEUED = 1  # its head is complete; it waits for its turn (pipelining) or is refused
CONNECTING = 2  # bound to a pod, waiting for an upstream connection
SENT = 3  # some byte of it was handed to an upstream connection; no response yet
STREAMING = 4  # the response head went to the client; its body follows
DONE = 5  # answered, or given up
STATE_NAMES = ("parsing", "queued", "connecting", "sent", "streaming", "done")

MAX_ATTEMPTS = 2
# A write's body is kept for a resend after a fence's 421 up to this size; a longer one is
# answered 503 shard_moving instead (the client retries it).
RESEND_BODY_LIMIT = 65536
FENCE_FIELD = b"\r\nx-shard-fence:"
EPOCH_LINE = b"\r\nX-Shard-Epoch: "
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
LAST_CHUNK = b"0\r\n\r\n"


class Exchange(ResponseSink):
    """One request/response pair on a client connection."""

    __slots__ = (
        "attempts",
        "body_bytes",
        "chunked",
        "client",
        "dechunker",
        "decision",
        "error",
        "expect_continue",
        "fenced_by",
        "fenced_generation",
        "head",
        "held_until",
        "http10",
        "is_head",
        "is_write",
        "keep_alive",
        "key",
        "limit_pending",
        "method",
        "on_trial",
        "operation",
        "pending",
        "pending_bytes",
        "pod",
        "refusal",
        "request_done",
        "resent",
        "retrying",
        "rid",
        "sent_body",
        "served_by",
        "span",
        "start_time",
        "state",
        "status",
        "target",
        "traceparent",
        "upstream",
    )

    def __init__(self, client: ClientSide, start_time: float) -> None:
        self.client = client
        self.start_time = start_time
        self.state = PARSING
        self.decision: Decision | None = None
        self.refusal: Refusal | None = None  # set when the gateway answers this request itself
        self.error: str | None = None  # the error code the gateway answered with, if any
        self.head = b""  # the head to send upstream, but its X-Shard-Group line
        self.rid = b""
        self.method = b""
        self.target = b""
        self.pending: list[bytes] = []  # body bytes not yet handed to an upstream connection
        self.pending_bytes = 0
        self.body_bytes = 0
        self.chunked = False
        self.request_done = False  # the whole request was read
        self.keep_alive = True  # the client's connection goes on after this exchange
        self.http10 = False
        self.is_head = False
        self.is_write = False  # known even when the request is refused (for metrics and logs)
        self.key: bytes | None = None  # the shard key field's raw value, and the operation
        self.operation: bytes | None = None  # field's: what a resend is decided again on
        # A write's body as sent (a short one), kept for one resend after a fence's 421.
        self.sent_body: list[bytes] | None = None
        self.resent = False
        self.held_until = 0.0  # a write for a moving key, held until then (0: not held)
        # The group whose fenced pod refused it, and the generation of the gateway's view when
        # it did: held, it goes back there only on a newer view (a rollback, say).
        self.fenced_by = ""
        self.fenced_generation = 0
        self.on_trial = False  # bound to a pod as its trial request (passive health)
        self.limit_pending = False  # waiting for its rate limit's answer from Redis
        self.retrying = False  # a retry after a pod's failure, counted in the retry budget
        self.expect_continue = False
        self.status = 0  # of the response, once it is known
        self.attempts = 0
        self.pod: Pod | None = None  # the pod it is bound to (its in-flight count)
        self.served_by: Pod | None = None  # the last pod tried (kept for metrics, logs, spans)
        self.upstream: UpstreamConnection | None = None
        self.dechunker: Dechunker | None = None
        self.traceparent: bytes | None = None  # as sent upstream (the client's, or our span's)
        self.span: Any = None  # an OpenTelemetry span when this request is sampled

    @property
    def started(self) -> bool:
        return self.state > QUEUED

    @property
    def answered(self) -> bool:
        """The client got (or is getting) a response head."""
        return self.state >= STREAMING

    # -- request side -------------------------------------------------------------------------

    def head_complete(self, method: bytes) -> None:
        self.state = QUEUED
        self.method = method
        self.is_head = method == b"HEAD"

    def add_body(self, data: bytes) -> None:
        """A piece of the request body; kept until ``flush_body`` (once per read)."""
        self.body_bytes += len(data)
        if self.refusal is not None:
            return  # refused already: the body is read and dropped, to keep the connection usable
        self.pending.append(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.pending_bytes += len(data)

    def body_complete(self) -> None:
        self.request_done = True
        if self.chunked and self.refusal is None:
            self.pending.append(LAST_CHUNK)

    def flush_body(self) -> None:
        """Hand the body bytes read so far to the upstream connection, if there is one."""
        if self.pending and self.upstream is not None:
            self.upstream.send(b"".join(self.pending))
            self.keep_for_resend(self.take_pending())

    def take_pending(self) -> list[bytes]:
        pending = self.pending
        self.pending = []
        self.pending_bytes = 0
        return pending

    def keep_for_resend(self, sent: list[bytes]) -> None:
        """Keep a write's body bytes as they went upstream, for a resend after a fence's 421
        (a short body only: ``may_resend``). ``sent`` is the list taken from ``pending``."""
        if not self.is_write or self.body_bytes > RESEND_BODY_LIMIT:
            return
        kept = self.sent_body
        if kept is None:
            self.sent_body = sent  # (nobody else holds it: no copy)
        else:
            kept.extend(sent)

    def may_resend(self) -> bool:
        """Whether a write a fence refused may go once more: once only, its whole body kept."""
        return (
            self.is_write and not self.resent and self.request_done and self.body_bytes <= RESEND_BODY_LIMIT
        )

    # -- binding to a pod ---------------------------------------------------------------------

    def bind(self, pod: Pod) -> None:
        """Tie this request to ``pod`` (counted in its in-flight requests) until ``release``."""
        self.attempts += 1
        self.client.ctx.retries.bound(self.attempts == 1)
        pod.inflight += 1
        pod.requests += 1
        if pod.trial and not pod.ejected:
            self.on_trial = True  # the one request it gets until answered
            self.client.ctx.health.trial_started(pod)
        self.pod = self.served_by = pod

    def release(self) -> None:
        if self.retrying:  # the retry it was ends (answered, failed, or its client left)
            self.retrying = False
            self.client.ctx.retries.give_back()
        pod = self.pod
        if pod is not None:
            self.client.ctx.retries.in_flight -= 1
            pod.inflight -= 1
            if self.on_trial:
                self.on_trial = False
                self.client.ctx.health.trial_abandoned(pod)  # (if unanswered: the next one tries)
            self.pod = None

    # -- sending ------------------------------------------------------------------------------

    def start(self) -> None:
        """It is this exchange's turn (the one before it is answered): refuse it or send it."""
        if self.limit_pending:
            return  # its rate limit is asked in Redis: limit_decided starts it
        client = self.client
        refusal = self.refusal
        if refusal is None and client.ctx.draining:
            refusal = DRAINED  # it arrived, or waited its turn, past the drain delay
        if refusal is None and self.held_until and not client.closed:
            refusal = self.decide_held()
            if refusal is None and self.held_until:
                return  # still held: the next topology, or the deadline, starts it again
        if refusal is not None:
            client.ctx.held.discard(self)
            client.refuse(self, refusal)
            return
        if self.expect_continue and not self.request_done:
            client.send(CONTINUE_RESPONSE)
        self.dispatch(None)

    def limit_decided(self, refusal: Refusal | None) -> None:
        """The answer of its rate limit, asked in Redis: refused (``refusal``), or free to go."""
        self.limit_pending = False
        if self.state != QUEUED or self.client.closed:
            return  # its client went away meanwhile
        if refusal is not None:
            self.refusal = refusal
        self.client.resume(self)

    def decide_held(self) -> Refusal | None:
        """A write held because its key is moving (or a fenced pod refused it), decided again on
        the newest view: sent once its key has an owner again (None, no longer held), kept held
        until its deadline (None, still held), then refused (the refusal). It goes nowhere
        while held, and never back to the group whose fence refused it."""
        ctx = self.client.ctx
        decision = self.decide_again()
        if isinstance(decision, Decision) and (
            decision.group != self.fenced_by or self._view_generation() > self.fenced_generation
        ):
            ctx.held.discard(self)
            ctx.metrics.held_writes_sent += 1
            self.held_until = 0.0
            self.route_on(decision)
            return None
        moving = isinstance(decision, Decision) or (
            isinstance(decision, Refusal) and decision.code == "shard_moving"
        )
        if moving and ctx.loop.time() < self.held_until:
            ctx.held.add(self)
            return None
        ctx.metrics.held_writes_refused += 1
        self.held_until = 0.0
        if isinstance(decision, Decision):  # the view still names the group that refused it
            return fenced_refusal(self.fenced_by, None)
        return decision if isinstance(decision, Refusal) else NOT_READY

    def _view_generation(self) -> int:
        topology = self.client.ctx.holder.current
        return (topology.generation or 0) if topology is not None else 0

    def _hold_seconds(self) -> float:
        topology = self.client.ctx.holder.current
        return topology.config.handoff.hold_seconds if topology is not None else 0.0

    def decide_again(self) -> Decision | Refusal | None:
        """Where this write may go on the gateway's newest view (None: no config loaded)."""
        topology = self.client.ctx.holder.current
        if topology is None:
            return None
        return decide(topology, self.method, self.key, self.operation)

    def route_on(self, decision: Decision) -> None:
        """Go where ``decision`` (made on the newest view) says, saying that view's epoch."""
        topology = self.client.ctx.holder.current
        assert topology is not None
        self.decision = decision
        self.head = with_epoch(self.head, topology.epoch_bytes)

    def dispatch(self, exclude: Pod | None, no_pod: Refusal | None = None) -> None:
        """Pick a pod of the allowed set (never outside it: a write's is its owner group's) and
        send the request on an idle pooled connection to it, or on a new one. A retry names the
        pod that failed (``exclude``) and the answer if no usable pod is left (``no_pod``)."""
        decision = self.decision
        assert decision is not None
        pod = choose_pod(decision.candidates, exclude)
        if pod is None and exclude is not None and exclude.eligible:
            pod = exclude  # its only usable pod (and not ejected): a fresh connection is the retry
        if pod is None and not decision.is_write:
            pod = self._read_elsewhere(exclude)
        if pod is None:
            self.client.refuse(self, no_pod if no_pod is not None else no_usable_pod(decision.group))
            return
        self.bind(pod)
        self.state = CONNECTING
        ctx = self.client.ctx
        link = ctx.pools.link(pod)
        now = ctx.loop.time()
        conn = link.acquire(now)
        if conn is not None:
            self.send_on(conn, now)
        else:
            ctx.loop.create_task(self._connect(link))

    def _read_elsewhere(self, exclude: Pod | None) -> Pod | None:
        """A read whose allowed set has no usable pod left (all ejected) goes to any other
        usable pod, unless ``reads: owner`` keeps it in its owner group. Never a write."""
        topology = self.client.ctx.holder.current
        if topology is None or topology.reads == "owner" or self.decision is topology.any_read:
            return None
        pod = choose_pod(topology.any_read.candidates, exclude)
        if pod is not None:
            self.decision = topology.any_read
        return pod

    async def _connect(self, link: PodLink) -> None:
        ctx = self.client.ctx
        pod = link.pod
        try:
            conn = await link.connect(ctx)
        except (OSError, TimeoutError) as exc:
            if self.pod is pod and not self.client.closed:
                self._connect_failed(pod, isinstance(exc, TimeoutError))
            return
        if self.pod is not pod or self.client.closed or self.state == DONE:
            conn.close()  # opened for a request that is gone (rare): not worth pooling
            return
        self.send_on(conn, ctx.loop.time())

    def _connect_failed(self, pod: Pod, timed_out: bool) -> None:
        self.client.ctx.health.failed(pod, CONNECT_TIMEOUT if timed_out else CONNECT_FAILURE, self.on_trial)
        code = "upstream_timeout" if timed_out else "upstream_error"
        detail = f"could not connect to a pod of group {pod.group}"
        failure = Refusal(504 if timed_out else 502, code, detail)
        if self.attempts < MAX_ATTEMPTS:
            # Nothing reached the pod (the body is still in ``pending``): safe to try another
            # (with no usable pod left, this failure is the answer).
            self.client.ctx.metrics.upstream_retries += 1
            self.release()
            self.dispatch(pod, failure)
            self.client.update_reading()
            return
        self.client.refuse(self, failure)

    def send_on(self, conn: UpstreamConnection, now: float) -> None:
        """Send the head (and the body read so far) on ``conn``; from here on, bytes of this
        request may have reached the pod."""
        self.state = SENT
        self.upstream = conn
        body = self.take_pending() if self.pending else None
        conn.start(self, body, now)
        if body is not None:
            self.keep_for_resend(body)
        self.client.update_reading()  # body bytes no longer wait for a connection

    # -- retries --------------------------------------------------------------------------------

    def may_retry(self) -> bool:
        """Whether a request whose upstream connection closed before any response may go again."""
        if self.attempts >= MAX_ATTEMPTS or not self.request_done or self.state != SENT:
            return False
        # Bytes were handed to the upstream. Only a bodiless idempotent read may go again (its
        # whole request is the head, which is kept); a write never does, whatever its method
        # (GET + "Operation-Type: write" is a write).
        return not self.is_write and self.method in _IDEMPOTENT and self.body_bytes == 0 and not self.chunked

    def _another_pod_usable(self) -> bool:
        """Whether a pod other than the one this request is bound to may take it now: of its
        allowed set, or (``reads`` not ``owner``) any pod, as ``dispatch`` would pick."""
        pod, decision = self.pod, self.decision
        if decision is not None and _eligible_other_than(pod, decision.candidates):
            return True
        topology = self.client.ctx.holder.current
        if topology is None or topology.reads == "owner":
            return False
        return _eligible_other_than(pod, topology.any_read.candidates)

    def retry_after_failure(self, no_pod: Refusal) -> bool:
        """Try this read again, on another pod, after a backoff with jitter: if the retry budget
        has room (else False, and the failure is the answer). ``no_pod``: the answer if, when
        the backoff ends, no usable pod is left."""
        ctx = self.client.ctx
        retries = ctx.retries
        if not retries.try_take():
            ctx.metrics.retry_budget_exhausted += 1
            return False
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()  # the rest of the failed answer is of no use
        failed = self.pod
        self.release()
        self.retrying = True  # (counted in the budget until this retry ends: release)
        self.state = CONNECTING  # bound to no pod while it waits
        ctx.metrics.upstream_retries += 1
        ctx.loop.call_later(retries.backoff(), self._retry_now, failed, no_pod)
        return True

    def _retry_now(self, failed: Pod | None, no_pod: Refusal) -> None:
        if self.state != CONNECTING or self.pod is not None or self.client.closed:
            return  # its client went away during the backoff
        self.dispatch(failed, no_pod)
        self.client.update_reading()

    # -- ResponseSink: what the upstream connection reports -------------------------------------

    def response_head(
        self, kept: bytes, status: int, framing: Framing, body: bytes | memoryview, group: bytes
    ) -> None:
        """The upstream's head, hop-by-hop fields already out (and the body bytes after it);
        ``group``: the serving pod's, for X-Shard-Group."""
        if self.pod is not None:
            self._pod_answered(self.pod, status, kept)
        if status == 421 and self.is_write and FENCE_FIELD in kept.lower():
            self.fenced()
            return
        if status in RETRIABLE_STATUSES and self.may_retry() and self._another_pod_usable():
            pod = self.served_by
            detail = f"pods of group {pod.group if pod is not None else '?'} answered {status}"
            if self.retry_after_failure(Refusal(502, "upstream_error", detail)):
                return  # this answer is not passed on: another pod's is
        ctx = self.client.ctx
        if framing.until_close or (framing.chunked and self.http10) or ctx.draining or ctx.closing:
            # The body ends at the close (until_close; chunks decoded for HTTP/1.0), or the
            # connection ends anyway.
            self.keep_alive = False
        self.status = status
        self.state = STREAMING
        if framing.dechunk:
            kept = without_transfer_encoding(kept)
        connection = connection_field(not self.keep_alive, self.http10)
        self.client.send(finish_head(kept, group, self.rid, connection, b"" if framing.dechunk else body))
        if framing.dechunk:
            self.dechunker = _dechunker_to(self.client)
            if body:
                self.dechunker.feed(body)

    def _pod_answered(self, pod: Pod, status: int, kept: bytes) -> None:
        """Tell passive health what the pod answered. A fence's own answers (its 421s, its
        503 shard_state_unconfirmed: ``X-Shard-Fence``) say the pod works: never a failure."""
        server_error = status >= 500 and FENCE_FIELD not in kept.lower()
        self.client.ctx.health.answered(pod, server_error, self.on_trial)

    def fenced(self) -> None:
        """The pod's fence refused the write before its handler ran: the gateway's view was
        older than the pod's. Not passed on: sent once more to the owner in the newest view
        when that is another group; else, while the control plane reads the shard state again,
        held (``handoff.hold_seconds``) for a newer view to name its owner; else answered
        503 shard_moving. Once more at most, and only with its whole body kept."""
        client = self.client
        ctx = client.ctx
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()  # the rest of the 421 is of no use; the exchange is done with it
        refused_by = self.pod
        group = refused_by.group if refused_by is not None else ""
        ctx.ask_for_newer_view()  # the pod holds a newer shard state than this view
        decision = self.decide_again()
        elsewhere = isinstance(decision, Decision) and decision.is_write and decision.group != group
        # Held only while a newer view may yet name another owner: the view names the group
        # that refused it, or the key is moving. (Any other refusal is answered at once.)
        waiting = isinstance(decision, Decision) or (
            isinstance(decision, Refusal) and decision.code == "shard_moving"
        )
        hold = self._hold_seconds() if waiting and not elsewhere else 0.0
        if not self.may_resend() or not (elsewhere or hold > 0):
            ctx.metrics.fenced_writes_refused += 1
            client.refuse(self, fenced_refusal(group, decision))
            return
        self.resent = True
        self.fenced_by, self.fenced_generation = group, self._view_generation()
        self.release()
        body, self.sent_body = self.sent_body, None
        self.pending = body if body is not None else []
        self.state = QUEUED
        if elsewhere:
            assert isinstance(decision, Decision)
            ctx.metrics.fenced_writes_resent += 1
            self.route_on(decision)
            self.dispatch(None)
        else:
            ctx.metrics.fenced_writes_held += 1
            self.held_until = ctx.loop.time() + hold
            self.start()  # held until a newer view names another owner, or refused at the end
        client.update_reading()

    def response_body(self, data: bytes | memoryview) -> None:
        if self.dechunker is not None:
            self.dechunker.feed(data)
        else:
            self.client.send(data)

    def response_complete(self, now: float) -> None:
        self.state = DONE
        self.upstream = None
        if not self.request_done:
            self.keep_alive = False  # answered early: the rest of its body would desync the client
        self.client.exchange_done(self, now)

    def upstream_lost(self, reused_connection: bool, until_close: bool) -> None:
        """The upstream connection closed under this exchange."""
        self.upstream = None
        if self.state == DONE:
            return
        if self.state == STREAMING:
            if until_close:  # a close-delimited body: the close is the end of the response
                self.state = DONE
                self.keep_alive = False
                self.client.exchange_done(self, self.client.ctx.loop.time())
            else:
                self.client.abort(self)  # the client must see a truncated response, never a fake end
            return
        if not reused_connection and self.pod is not None:
            # (A kept-alive connection closed under a request says nothing about its pod.)
            self.client.ctx.health.failed(self.pod, RESET, self.on_trial)
        if self.may_retry() and reused_connection:
            # A stale kept-alive connection says nothing about its pod: any pod will do, now
            # (it costs no pod anything: outside the retry budget).
            self.client.ctx.metrics.upstream_retries += 1
            self.release()
            self.dispatch(None, UPSTREAM_CLOSED)
            self.client.update_reading()
            return
        if self.may_retry() and self.retry_after_failure(UPSTREAM_CLOSED):
            return  # the pod reset it: another pod, after a backoff, within the budget
        self.client.refuse(self, UPSTREAM_CLOSED)

    def upstream_invalid(self) -> None:
        self._upstream_failed(UPSTREAM_INVALID)

    def internal_error(self) -> None:
        """A bug of ours while handling the response (logged where it was caught)."""
        self._upstream_failed(INTERNAL_ERROR)

    def upstream_timeout(self) -> None:
        if self.state != STREAMING and self.request_done and self.pod is not None:
            # No answer in time to a whole request (a slow upload is not the pod's fault).
            self.client.ctx.health.failed(self.pod, TIMEOUT, self.on_trial)
        self._upstream_failed(UPSTREAM_TIMEOUT)

    def _upstream_failed(self, refusal: Refusal) -> None:
        self.upstream = None
        if self.state == STREAMING:
            self.client.abort(self)
        else:
            self.client.refuse(self, refusal)

    def upstream_full(self, full: bool) -> None:
        """The upstream's write buffer filled (or drained): stop (or go on) reading the body."""
        self.client.upstream_full(full)

    def client_writable(self) -> bool:
        return self.client.writable()


def with_epoch(head: bytes, epoch: bytes) -> bytes:
    """``head`` with the gateway's X-Shard-Epoch line (its last one) saying ``epoch``."""
    at = head.rfind(EPOCH_LINE)
    if at < 0:
        return head
    start = at + len(EPOCH_LINE)
    end = head.find(b"\r\n", start)
    return head[:start] + epoch + head[end:]


def _eligible_other_than(pod: Pod | None, candidates: tuple[Pod, ...]) -> bool:
    for candidate in candidates:
        if candidate is not pod and candidate.eligible:
            return True
    return False


def moving_in_flight(exchange: Exchange, handoff: Handoff) -> bool:
    """Whether ``exchange`` is a write whose key moves under ``handoff``, decided on an earlier
    view and on its way to a pod (or there, or waiting its turn behind a pipelined request):
    what the hand-off's barrier waits for to end. (A write decided on the view in force is held
    or refused instead, so having a decision for a moving key means an earlier view's.)"""
    key, decision = exchange.key, exchange.decision
    if not exchange.is_write or exchange.held_until or not QUEUED <= exchange.state <= STREAMING:
        return False
    if key is None or decision is None or decision.group is None:
        return False
    return moving_to(handoff, key, decision.group) is not None


def no_usable_pod(group: str | None) -> Refusal:
    """The answer when the allowed set has no pod that is ready and not ejected."""
    detail = (
        f"shard group {group} has no usable pod (none ready, or all ejected)" if group else "no usable pod"
    )
    return Refusal(503, "shard_unavailable", detail, 1, group)


def fenced_refusal(group: str, decision: Decision | Refusal | None) -> Refusal:
    """What a write refused by a fenced pod is answered when it is not sent again."""
    if isinstance(decision, Refusal) and decision.code == "shard_moving":
        return decision  # the newest view says so itself
    detail = f"a pod of group {group} refused this write: its key is moving or moved; retry"
    return Refusal(503, "shard_moving", detail, retry_after=1)


def _dechunker_to(client: ClientSide) -> Dechunker:
    """A de-chunker writing to ``client`` (its bound ``send``: a plain function here, because a
    typed attribute's method is a C function in the compiled build, not a Python callable)."""
    return Dechunker(client.send)


CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
# After the drain delay nothing new is forwarded (the contract's not_ready, while draining).
DRAINED = Refusal(503, "not_ready", "the gateway is shutting down; retry on another replica", retry_after=1)
UPSTREAM_CLOSED = Refusal(502, "upstream_error", "upstream closed the connection before responding")
UPSTREAM_INVALID = Refusal(502, "upstream_error", "upstream sent an invalid response")
UPSTREAM_TIMEOUT = Refusal(504, "upstream_timeout", "upstream did not answer in time")
INTERNAL_ERROR = Refusal(500, "internal_error", "the gateway failed to handle this request")
