"""State shared by every connection of one data-plane process, and the deadline sweeper.

Timeouts are deadlines stored on connections (one float each) and checked by a single
periodic sweep, instead of a timer handle created and cancelled per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.config import Limits
from gateway.observability.logs import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import Tracing
from gateway.proxy.health import Outliers
from gateway.proxy.http import RequestIds
from gateway.proxy.pool import Pools
from gateway.proxy.ratelimit import RateLimiter
from gateway.proxy.retries import RetryBudget
from gateway.redis_limits import RedisLimits
from gateway.topology import TopologyHolder

if TYPE_CHECKING:
    from gateway.proxy.client import ClientConnection
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.upstream import UpstreamConnection


# Seconds between two asks for the shard state. An ask dropped inside this window loses
# nothing: the follower waits MIN_READ_SPACING (the same 50 ms) after each wake before it
# reads, so the read the first ask caused is sent after every 421 of the window arrived.
ASK_SPACING = 0.05


class HasDeadline(Protocol):
    deadline: float

    def on_deadline(self, now: float) -> None: ...


class ProxyContext:
    """What every connection of one data-plane process shares: the topology, settings,
    counters, the pods' connection pools, the open connections, the drain state."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        holder: TopologyHolder,
        metrics: Metrics,
        limits: Limits,
        tracing: Tracing | None = None,
        access_log: AccessLog | None = None,
        read_state_soon: Callable[[], None] | None = None,
        limit_share: int = 1,
    ) -> None:
        self.loop = loop
        self.tracing = tracing  # None: tracing off, and free
        self.access_log = access_log or AccessLog()
        self.holder = holder
        self.metrics = metrics
        self.limits = limits
        # A Content-Length with fewer digits than the body limit is below it (no int() needed).
        self.body_limit_digits = len(str(limits.max_body_bytes))
        self.next_id = iter(RequestIds())  # next(ctx.next_id): a new request id, made in C
        self.pools = Pools(metrics)
        self.health = Outliers(loop, holder, metrics)  # passive health: which pods are ejected
        holder.subscribe(self.health.on_topology)
        # Rate limits: the buckets (each of --workers W keeps 1/W of them), then Redis, if the
        # config names one, for the per-key buckets (it reads the limits the limiter took).
        self.retries = RetryBudget()  # read retries after a pod's failure, against requests in flight
        self.limiter = RateLimiter(metrics, limit_share)
        self.redis_limits = RedisLimits(loop, self.limiter, metrics)
        holder.subscribe(self.limiter.on_topology)
        holder.subscribe(self.redis_limits.on_topology)
        if holder.current is not None:
            self.limiter.on_topology(holder.current)
            self.redis_limits.on_topology(holder.current)
        self.clients: set[ClientConnection] = set()
        self.upstreams: set[UpstreamConnection] = set()
        # Writes for moving keys held during a fence phase (Exchange.decide_held): started again
        # on each new topology and at the sweep, which answers those past their deadline.
        self.held: set[Exchange] = set()
        holder.subscribe(self._start_held)
        # Asks the control plane to read the shard state now (a fenced pod knows a newer one).
        self.read_state_soon = read_state_soon
        self.asked_for_state = -1.0  # loop time of the last ask (a burst of 421s asks once)
        self.draining = False
        self.closing = False  # drain delay: serve, but end keep-alive after each response
        timeouts = [
            limits.client_header_timeout,
            limits.client_idle_timeout,
            limits.upstream_header_timeout,
            limits.upstream_idle_timeout,
        ]
        # Resolution of a quarter of the shortest timeout, between 50 ms and 1 s.
        self.sweep_interval = min(1.0, max(0.05, min(t for t in timeouts if t > 0) / 4))
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep_forever())

    async def stop(self) -> None:
        await self.redis_limits.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass

    async def _sweep_forever(self) -> None:
        loop, interval, lag = self.loop, self.sweep_interval, self.metrics.loop_lag
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            now = loop.time()
            # How late the loop woke us is its lag: the wait every callback had on this tick.
            lag.observe(max(0.0, now - due))
            self.sweep(now)

    def sweep(self, now: float) -> None:
        expired: list[HasDeadline] = [c for c in self.clients if 0 < c.deadline <= now]
        expired.extend(u for u in self.upstreams if 0 < u.deadline <= now)
        for item in expired:
            if 0 < item.deadline <= now:  # an earlier expiry may have moved it
                item.on_deadline(now)
        if self.held:
            for exchange in [e for e in self.held if e.held_until <= now]:
                self._start_one_held(exchange)

    def _start_held(self, _topology: object) -> None:
        for exchange in list(self.held):
            self._start_one_held(exchange)

    def _start_one_held(self, exchange: Exchange) -> None:
        if exchange.client.closed:
            self.held.discard(exchange)  # its client went away: nothing to answer
        else:
            exchange.start()

    def ask_for_newer_view(self) -> None:
        """A fenced pod refused a write: its view of the shard state is newer than this one.
        The control plane reads the state at once (at most one ask per ``ASK_SPACING``)."""
        now = self.loop.time()
        if self.read_state_soon is not None and now - self.asked_for_state >= ASK_SPACING:
            self.asked_for_state = now
            self.read_state_soon()

    def close_idle_clients(self) -> None:
        for client in list(self.clients):
            client.close_if_idle()
