"""What a finished exchange leaves behind: its counters, its span, and (by policy) a log line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.exchange import Exchange

CLIENT_CLOSED = 499  # nginx's code for "the client went away", used in metrics only


def record(ctx: ProxyContext, exchange: Exchange, status: int, now: float, peer: bytes) -> None:
    """Count a finished exchange under its group and kind; end its span; log it if wanted."""
    decision = exchange.decision
    group = decision.group if decision is not None else None
    if not group:  # a read to any pod: its group is its pod's
        pod = exchange.served_by
        group = pod.group if pod is not None else "none"
    seconds = now - exchange.start_time
    metrics = ctx.metrics
    metrics.route(group, exchange.is_write).observe(status, seconds)
    if exchange.span is not None:
        pod = exchange.served_by
        ctx.tracing.finish(  # type: ignore[union-attr]
            exchange.span, status, {"shardgate.group": group, "shardgate.pod": pod.address if pod else ""}
        )
        exchange.span = None
    access = ctx.access_log
    if access.enabled and (status >= 500 or seconds >= access.slow or access.sampling):
        if access.wants(status, seconds):
            _log(ctx, exchange, status, seconds, group, peer)


def _log(ctx: ProxyContext, exchange: Exchange, status: int, seconds: float, group: str, peer: bytes) -> None:
    topology = ctx.holder.current
    traceparent = exchange.traceparent
    pod = exchange.served_by
    ctx.access_log.log(
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
            "client": peer.decode("latin-1"),
            "error": exchange.error,
        }
    )
