"""The data plane of one process: the listening socket, its connections, and their shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.config import Limits
from gateway.observability.logs import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import Tracing
from gateway.observability.tracing import shutdown as shutdown_tracing
from gateway.proxy.client import ClientConnection
from gateway.proxy.context import ProxyContext
from gateway.proxy.exchange import moving_in_flight
from gateway.topology import Pod, Topology, TopologyHolder, no_health

log = logging.getLogger("shardgate")

RECOUNT_INTERVAL = 0.1  # seconds between two counts of moving writes in flight, while any are left


class DataPlane:
    def __init__(
        self,
        listen: tuple[str, int],
        limits: Limits,
        holder: TopologyHolder,
        metrics: Metrics,
        reuse_port: bool = False,
        tracing: Tracing | None = None,
        access_log: AccessLog | None = None,
        read_state_soon: Callable[[], None] | None = None,
        limit_share: int = 1,
    ) -> None:
        self._limit_share = limit_share  # --workers W: each worker's rate limits are 1/W
        self._tracing = tracing
        self._read_state_soon = read_state_soon  # a fenced pod's 421: read the shard state now
        self._access_log = access_log
        self._listen = listen
        self._limits = limits
        self._holder = holder
        self._metrics = metrics
        self._reuse_port = reuse_port  # workers each bind the same port (SO_REUSEPORT)
        self.ctx: ProxyContext | None = None
        self.listen_address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx = ProxyContext(
            loop,
            self._holder,
            self._metrics,
            self._limits,
            self._tracing,
            self._access_log,
            self._read_state_soon,
            self._limit_share,
        )
        # (ClientConnection implements asyncio.Protocol without subclassing it: compiled, it is
        # an extension type, which cannot have a Python base class.)
        self._server = await loop.create_server(
            lambda: ClientConnection(ctx),  # type: ignore[arg-type, return-value]
            self._listen[0],
            self._listen[1],
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            backlog=2048,
        )
        self.listen_address = self._server.sockets[0].getsockname()[:2]
        self._holder.subscribe(ctx.pools.on_topology)
        ctx.start()

    def moving_writes_in_flight(self) -> int:
        return moving_writes_in_flight(self.ctx) if self.ctx is not None else 0

    def pod_health(self, pod: Pod) -> dict[str, object]:
        """The pod's passive health here (for /debug/ring)."""
        return self.ctx.health.describe(pod) if self.ctx is not None else no_health(pod)

    def pod_stats(self, pod: Pod) -> tuple[int, int, int]:
        """(in-flight requests, open upstream connections, idle ones) of ``pod`` here."""
        return self.ctx.pools.stats(pod) if self.ctx is not None else (pod.inflight, 0, 0)

    def begin_drain(self) -> None:
        if self.ctx is not None:
            self.ctx.closing = True

    async def stop(self, grace: float) -> None:
        """Stop accepting; answer in-flight requests (Connection: close) for up to ``grace``
        seconds while closing connections as they go idle; then close whatever is left."""
        if self._server is not None:
            self._server.close()
        ctx = self.ctx
        if ctx is None:
            return
        ctx.draining = True
        ctx.close_idle_clients()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while ctx.clients and loop.time() < deadline:
            await asyncio.sleep(0.05)
            ctx.close_idle_clients()
        if ctx.clients:
            log.warning("grace timeout: closing %d connections still busy", len(ctx.clients))
        for client in list(ctx.clients):
            if client.transport is not None:
                client.transport.abort()
        for upstream in list(ctx.upstreams):
            upstream.abort()
        await ctx.stop()
        shutdown_tracing(self._tracing)  # flush the spans still queued


def moving_writes_in_flight(ctx: ProxyContext) -> int:
    """Writes in flight in ``ctx``, decided on an earlier view, whose key the hand-off in force
    moves (0 outside a hand-off)."""
    topology = ctx.holder.current
    handoff = topology.handoff if topology is not None else None
    if handoff is None:
        return 0
    return sum(
        1 for client in ctx.clients for exchange in client.exchanges if moving_in_flight(exchange, handoff)
    )


class BarrierReports:
    """What a hand-off's barrier asks of this process: the generation of the shard state it
    routes on and how many of its writes in flight are for keys moving under it. Told to
    ``tell`` at each new snapshot and when the last of those writes ends (counted every
    ``RECOUNT_INTERVAL`` until then): the barrier waits for none, not for a number, so the
    counts in between are not worth a Lease update each."""

    def __init__(
        self,
        moving_now: Callable[[], int],
        holder: TopologyHolder,
        tell: Callable[[int | None, int], None],
    ) -> None:
        self._moving_now = moving_now
        self._holder = holder
        self._tell = tell
        self._recount: asyncio.TimerHandle | None = None
        holder.subscribe(self._new_topology)

    def _new_topology(self, _topology: Topology) -> None:
        if self._recount is not None:
            self._recount.cancel()
        self.report_now()

    def report_now(self) -> None:
        topology = self._holder.current
        moving = self._moving_now()
        self._tell(topology.generation if topology is not None else None, moving)
        self._recount_later(moving)

    def _recount_moving(self) -> None:
        moving = self._moving_now()
        if moving == 0:
            self.report_now()  # the last one ended
        else:
            self._recount_later(moving)

    def _recount_later(self, moving: int) -> None:
        loop = asyncio.get_running_loop()
        self._recount = loop.call_later(RECOUNT_INTERVAL, self._recount_moving) if moving else None
