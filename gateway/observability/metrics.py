"""Hot-path counters in plain integers, exported through a prometheus-client collector.

Calling prometheus-client per request costs 0.5-1 us per call (see PERFORMANCE-NOTES.md);
``list[i] += 1`` costs 0.03 us. The data plane therefore only bumps integers held by
``RouteStats`` objects that it resolves once per (group, kind), and the collector turns them
into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from gateway.topology import Pod, PodState, Topology

# Seconds. Dense at the low end, where a proxy's own latency lives.
DURATION_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
NO_GROUP = "none"  # label for requests refused before a group was known


class WatchView(Protocol):
    """What the collector reads of a discovery watch (gateway.discovery.kubernetes.WatchStatus)."""

    resource: str
    up: bool
    last_event_at: float | None
    reconnects: int
    relists: int


class RouteStats:
    """Counters for one (group, kind): status classes and a duration histogram."""

    __slots__ = ("buckets", "codes", "total_seconds")

    def __init__(self) -> None:
        self.codes = [0, 0, 0, 0, 0]  # index = status // 100 - 1
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)  # last slot = +Inf
        self.total_seconds = 0.0

    def observe(self, status: int, seconds: float) -> None:
        index = status // 100 - 1
        if 0 <= index < 5:
            self.codes[index] += 1
        self.buckets[bisect_left(DURATION_BOUNDS, seconds)] += 1
        self.total_seconds += seconds


class Metrics:
    """All counters of one process. Only plain attribute and list updates on the hot path."""

    def __init__(self) -> None:
        self._reads: dict[str, RouteStats] = {}
        self._writes: dict[str, RouteStats] = {}
        self.refusals: dict[str, int] = {}
        self.reloads: dict[str, int] = {"applied": 0, "rejected": 0, "unchanged": 0}
        self.last_reload_success: float | None = None
        self.upstream_connects = 0
        self.upstream_connect_failures = 0
        self.upstream_retries = 0
        self.client_connections_open = 0
        self.client_connections_total = 0
        self.topology_swaps = 0
        self.worker_restarts = 0
        self.workers_ready: int | None = None  # set by the supervisor of --workers N

    def route(self, group: str, write: bool) -> RouteStats:
        table = self._writes if write else self._reads
        stats = table.get(group)
        if stats is None:
            stats = table[group] = RouteStats()
        return stats

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1
        if result in ("applied", "unchanged"):
            self.last_reload_success = time.time()

    # Counters a worker process reports to the supervisor, which sums them (see gateway.workers).
    _SUMMED = (
        "upstream_connects",
        "upstream_connect_failures",
        "upstream_retries",
        "client_connections_open",
        "client_connections_total",
    )

    def snapshot(self) -> dict[str, object]:
        """Plain-data copy of the data-plane counters, for another process to merge."""
        return {
            "routes": [
                [group, kind, stats.codes, stats.buckets, stats.total_seconds]
                for group, kind, stats in self.routes()
            ],
            "refusals": dict(self.refusals),
            "counters": {name: getattr(self, name) for name in self._SUMMED},
        }

    def reset_data_plane(self) -> None:
        """Zero what ``merge`` adds up, keeping control-plane counters (reloads, swaps)."""
        self._reads.clear()
        self._writes.clear()
        self.refusals.clear()
        for name in self._SUMMED:
            setattr(self, name, 0)

    def merge(self, snapshot: dict[str, object]) -> None:
        """Add a worker's ``snapshot`` into this (supervisor-side) object."""
        for group, kind, codes, buckets, total in snapshot["routes"]:  # type: ignore[attr-defined]
            stats = self.route(group, kind == "write")
            stats.codes = [a + b for a, b in zip(stats.codes, codes, strict=True)]
            stats.buckets = [a + b for a, b in zip(stats.buckets, buckets, strict=True)]
            stats.total_seconds += total
        for reason, value in snapshot["refusals"].items():  # type: ignore[attr-defined]
            self.refusals[reason] = self.refusals.get(reason, 0) + value
        for name, value in snapshot["counters"].items():  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + value)

    def routes(self) -> Iterator[tuple[str, str, RouteStats]]:
        for group, stats in self._reads.items():
            yield group, "read", stats
        for group, stats in self._writes.items():
            yield group, "write", stats


class GatewayCollector(Collector):
    """Builds the shardgate_* families from ``Metrics`` and the current topology at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        topology: Callable[[], Topology | None],
        watches: Callable[[], Iterable[WatchView]] = tuple,
        inflight: Callable[[Pod], int] | None = None,
    ) -> None:
        self._metrics = metrics
        self._topology = topology
        self._watches = watches
        self._inflight = inflight or _own_inflight

    def collect(self) -> Iterator[object]:
        m = self._metrics
        requests = CounterMetricFamily(
            "shardgate_requests", "Proxied requests by group, kind and status class.",
            labels=["group", "kind", "code_class"],
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "shardgate_request_duration_seconds",
            "Time from request headers received to response complete.",
            labels=["group", "kind"],
        )
        for group, kind, stats in m.routes():
            for code_class, value in zip(CODE_CLASSES, stats.codes, strict=True):
                if value:
                    requests.add_metric([group, kind, code_class], value)
            cumulative, running = [], 0
            for bound, value in zip((*DURATION_BOUNDS, float("inf")), stats.buckets, strict=True):
                running += value
                cumulative.append((_bound_label(bound), running))
            duration.add_metric([group, kind], cumulative, stats.total_seconds)
        yield requests
        yield duration

        refusals = CounterMetricFamily(
            "shardgate_refusals", "Requests answered by the gateway itself, by reason.", labels=["reason"]
        )
        for reason, value in sorted(m.refusals.items()):
            refusals.add_metric([reason], value)
        yield refusals

        reloads = CounterMetricFamily(
            "shardgate_config_reloads", "Shard config loads by result.", labels=["result"]
        )
        for result, value in sorted(m.reloads.items()):
            reloads.add_metric([result], value)
        yield reloads
        if m.last_reload_success is not None:
            yield GaugeMetricFamily(
                "shardgate_config_last_success_age_seconds",
                "Seconds since the shard config was last loaded successfully.",
                value=max(0.0, time.time() - m.last_reload_success),
            )

        yield CounterMetricFamily(
            "shardgate_upstream_connects", "Upstream connections opened.", value=m.upstream_connects
        )
        yield CounterMetricFamily(
            "shardgate_upstream_connect_failures",
            "Upstream connection attempts that failed.",
            value=m.upstream_connect_failures,
        )
        yield CounterMetricFamily(
            "shardgate_upstream_retries",
            "Requests tried again on another pod before any byte reached the first.",
            value=m.upstream_retries,
        )
        yield GaugeMetricFamily(
            "shardgate_client_connections", "Open client connections.", value=m.client_connections_open
        )
        yield CounterMetricFamily(
            "shardgate_topology_swaps", "Topology snapshots swapped in.", value=m.topology_swaps
        )
        if m.workers_ready is not None:
            yield GaugeMetricFamily(
                "shardgate_workers_ready",
                "Data-plane worker processes up and serving.",
                value=m.workers_ready,
            )
            yield CounterMetricFamily(
                "shardgate_worker_restarts",
                "Worker processes restarted after dying.",
                value=m.worker_restarts,
            )
        yield from self._discovery()

        topology = self._topology()
        if topology is None:
            return
        yield InfoMetricFamily(
            "shardgate_config_epoch", "The shard config epoch in force.", value={"epoch": topology.epoch}
        )
        yield GaugeMetricFamily("shardgate_ring_groups", "Groups on the ring.", value=len(topology.groups))
        yield GaugeMetricFamily("shardgate_ring_points", "Points on the ring.", value=topology.ring.points)
        pods = GaugeMetricFamily(
            "shardgate_group_pods", "Pods per group by state.", labels=["group", "state"]
        )
        inflight = GaugeMetricFamily(
            "shardgate_pod_inflight_requests", "Requests in flight per pod.", labels=["group", "pod"]
        )
        for group in topology.groups.values():
            states = dict.fromkeys((PodState.READY, PodState.NOT_READY, PodState.TERMINATING), 0)
            for pod in group.pods:
                if pod.state in states:
                    states[pod.state] += 1
                inflight.add_metric([group.name, pod.address], self._inflight(pod))
            for state, value in states.items():
                pods.add_metric([group.name, str(state)], value)
        yield pods
        yield inflight

    def _discovery(self) -> Iterator[object]:
        watches = list(self._watches())
        if not watches:
            return
        up = GaugeMetricFamily(
            "shardgate_discovery_watch_up",
            "1 while the watch reaches the API server; 0 while routing on the last known state.",
            labels=["resource"],
        )
        reconnects = CounterMetricFamily(
            "shardgate_discovery_reconnects", "Watch failures followed by a retry.", labels=["resource"]
        )
        relists = CounterMetricFamily(
            "shardgate_discovery_relists", "Re-lists after 410 Gone.", labels=["resource"]
        )
        age = GaugeMetricFamily(
            "shardgate_discovery_last_event_age_seconds",
            "Seconds since the watch last delivered an event (bookmarks included).",
            labels=["resource"],
        )
        now = time.time()
        for watch in watches:
            up.add_metric([watch.resource], 1.0 if watch.up else 0.0)
            reconnects.add_metric([watch.resource], watch.reconnects)
            relists.add_metric([watch.resource], watch.relists)
            if watch.last_event_at is not None:
                age.add_metric([watch.resource], max(0.0, now - watch.last_event_at))
        yield up
        yield reconnects
        yield relists
        yield age


def _own_inflight(pod: Pod) -> int:
    return pod.inflight


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
