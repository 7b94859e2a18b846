"""The data plane's side of each pod: its idle keep-alive connections and per-pod runtime state.

``topology.Pod`` is the domain's pod (identity, state, load); what only the data plane needs of
it lives on a ``PodLink``, one per pod in this process: the idle pool, the count of open
connections, the bytes written for its group, its latency histogram. ``Pools`` finds a pod's
link and, on every topology swap, closes the idle connections of pods that left the eligible
set (busy ones close when their exchange ends) and forgets pods that are gone.
"""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING

from gateway.observability.metrics import Histogram, Metrics
from gateway.topology import Pod, PodState, Topology

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.upstream import UpstreamConnection

_READY = PodState.READY
# Checking costs a poll() (~1-2 us); connections reused within this many seconds skip it.
STALE_CHECK_AFTER = 0.05
_POLLER = select.poll()
_INPUT_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class PodLink:
    """One pod as the data plane of this process sees it."""

    __slots__ = ("_header_latency", "_metrics", "connections", "group_bytes", "group_line", "idle", "pod")

    def __init__(self, pod: Pod, metrics: Metrics) -> None:
        self.pod = pod
        self._metrics = metrics
        self.group_bytes = pod.group.encode()  # as the response's X-Shard-Group says it
        self.group_line = b"X-Shard-Group: " + self.group_bytes + b"\r\n\r\n"  # ends a request head
        self.idle: list[UpstreamConnection] = []  # most recently used last
        self.connections = 0  # open upstream connections, idle and busy
        self._header_latency: Histogram | None = None  # made at the first response (no empty series)

    def observe_header_latency(self, seconds: float) -> None:
        """Request sent -> response head received, in the group's histogram."""
        histogram = self._header_latency
        if histogram is None:
            histogram = self._header_latency = self._metrics.response_headers(self.pod.group)
        histogram.observe(seconds)

    def acquire(self, now: float) -> UpstreamConnection | None:
        """The most recently used live idle connection (warm in every cache), if any.

        A connection that sat idle for a while is checked for a close notice the event loop has
        not processed yet (servers close idle keep-alive connections on their own schedule);
        sending a request into such a connection would fail after the request left us.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.usable():
                continue
            if now - conn.idle_since > STALE_CHECK_AFTER and _has_pending_input(conn.fd):
                conn.abort()  # EOF, reset or stray bytes: nothing a new request could use
                continue
            conn.reused = True
            return conn
        return None

    def release(self, conn: UpstreamConnection, now: float, ctx: ProxyContext) -> None:
        """An exchange on ``conn`` ended: back to the pool, or closed. The one place a
        connection is pooled."""
        if (
            not conn.keep_alive
            or not conn.usable()
            or self.pod.state is not _READY
            or ctx.draining
            or len(self.idle) >= ctx.limits.max_idle_per_pod
        ):
            conn.close()
            return
        conn.idle_at(now, now + ctx.limits.upstream_idle_timeout)
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` closed."""
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    async def connect(self, ctx: ProxyContext) -> UpstreamConnection:
        """A new connection to the pod within the connect timeout; OSError or TimeoutError."""
        from gateway.proxy.upstream import UpstreamConnection  # (the one import that way)

        loop = ctx.loop
        started = loop.time()
        pod = self.pod
        try:
            async with asyncio.timeout(ctx.limits.connect_timeout):
                # (UpstreamConnection implements asyncio.Protocol without subclassing it: compiled,
                # it is an extension type, which cannot have a Python base class.)
                _, conn = await loop.create_connection(  # type: ignore[type-var]
                    lambda: UpstreamConnection(ctx, self), pod.host, pod.port
                )
        except (OSError, TimeoutError):
            ctx.metrics.upstream_connect_failures += 1
            raise
        ctx.metrics.upstream_connects += 1
        ctx.metrics.connect(pod.group).observe(loop.time() - started)
        return conn


class Pools:
    """Every pod's link in this process, kept in step with the topology."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._links: dict[Pod, PodLink] = {}

    def link(self, pod: Pod) -> PodLink:
        link = self._links.get(pod)
        if link is None:
            link = self._links[pod] = PodLink(pod, self._metrics)
        return link

    def on_topology(self, topology: Topology) -> None:
        """A new snapshot: pods no longer eligible get no new requests (the router sees to
        that); here their idle connections close at once, and links of removed pods go."""
        current = {pod for group in topology.groups.values() for pod in group.pods}
        for pod, link in list(self._links.items()):
            if pod.state is not _READY:
                link.close_idle()
            if pod not in current and not link.connections:
                del self._links[pod]

    def stats(self, pod: Pod) -> tuple[int, int, int]:
        """(in-flight requests, open upstream connections, idle ones) of ``pod`` here."""
        link = self._links.get(pod)
        if link is None:
            return pod.inflight, 0, 0
        return pod.inflight, link.connections, len(link.idle)

    def close_all_idle(self) -> None:
        for link in self._links.values():
            link.close_idle()


def _has_pending_input(fd: int) -> bool:
    """Whether an idle socket has something to read: for an idle upstream, a close or garbage."""
    if fd < 0:
        return False
    _POLLER.register(fd, _INPUT_EVENTS)
    try:
        return bool(_POLLER.poll(0))
    finally:
        _POLLER.unregister(fd)
