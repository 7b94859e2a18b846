"""Hot-path counters in plain integers, exported through a prometheus-client collector.

Calling prometheus-client per request costs 0.5-1 us per call (see PERFORMANCE-NOTES.md);
``list[i] += 1`` costs 0.03 us. The data plane therefore only bumps integers held by
``RouteStats``/``Histogram`` objects that it resolves once per (group, kind), and the collector
turns them into metric families when Prometheus scrapes. With ``--workers N`` each worker sends
``Metrics.snapshot()`` to the supervisor, which adds them up with ``merge`` (histograms are
merged bucket by bucket, so quantiles over the sum are right).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from gateway.topology import (
    EJECTED,
    HEALTHY,
    TRIAL,
    PodHealthView,
    PodState,
    PodStats,
    Topology,
    no_health,
    unpooled_stats,
)

# Seconds. Dense at the low end, where a proxy's own latency lives.
DURATION_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
LAG_BOUNDS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class WatchView(Protocol):
    """What the collector reads of a discovery watch (gateway.discovery.kubernetes.WatchStatus)."""

    resource: str
    state: str
    up: bool
    last_event_at: float | None
    reconnects: int
    relists: int


class Histogram:
    """Bucket counts (non-cumulative; last slot = +Inf) and the sum of observations."""

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BOUNDS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.total += value

    def dump(self) -> list[Any]:
        return [self.buckets, self.total]

    def add(self, dumped: list[Any]) -> None:
        buckets, total = dumped
        self.buckets = [a + b for a, b in zip(self.buckets, buckets, strict=True)]
        self.total += total

    def family_value(self) -> tuple[list[tuple[str, float]], float]:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, value in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += value
            cumulative.append((_bound_label(bound), running))
        return cumulative, self.total


class RouteStats:
    """Counters for one (group, kind): status classes and a duration histogram."""

    __slots__ = ("codes", "duration")

    def __init__(self) -> None:
        self.codes = [0, 0, 0, 0, 0]  # index = status // 100 - 1
        self.duration = Histogram()

    def observe(self, status: int, seconds: float) -> None:
        index = status // 100 - 1
        if 0 <= index < 5:
            self.codes[index] += 1
        self.duration.observe(seconds)


class Metrics:
    """All counters of one process. Only plain attribute and list updates on the hot path."""

    # Data-plane counters a worker reports to the supervisor, which sums them.
    _SUMMED = (
        "upstream_connects",
        "upstream_connect_failures",
        "upstream_retries",
        "retry_budget_exhausted",
        "fenced_writes_resent",
        "fenced_writes_refused",
        "fenced_writes_held",
        "held_writes_sent",
        "held_writes_refused",
        "client_connections_open",
        "client_connections_total",
        "bytes_received",
        "bytes_sent",
    )

    def __init__(self) -> None:
        self.read_routes: dict[str, RouteStats] = {}  # read by the hot path directly
        self.write_routes: dict[str, RouteStats] = {}
        self._connect: dict[str, Histogram] = {}
        self._response_headers: dict[str, Histogram] = {}
        self.loop_lag = Histogram(LAG_BOUNDS)
        self.refusals: dict[str, int] = {}
        self.ejections: dict[str, int] = {}  # "GROUP REASON" -> pods ejected (gateway.proxy.health)
        self.rate_limits: dict[str, int] = {}  # limit (global, per_group, per_key) -> requests refused
        # Per-key limits decided by the local bucket although the config names Redis, by reason:
        # timeout, error (the request's script failed), unavailable (Redis left alone a while).
        self.rate_limit_fallbacks: dict[str, int] = {}
        self.upstream_connects = 0
        self.upstream_connect_failures = 0
        self.upstream_retries = 0
        self.retry_budget_exhausted = 0  # reads a pod failed that the retry budget left unretried
        # Writes a fenced pod answered 421 (never passed on): sent again to the newest owner,
        # held for a newer view (then counted as held writes too), or answered 503 shard_moving.
        self.fenced_writes_resent = 0
        self.fenced_writes_refused = 0
        self.fenced_writes_held = 0
        # Writes for moving keys held during a fence phase: sent once their key had an owner
        # again, or answered 503 shard_moving at handoff.hold_seconds.
        self.held_writes_sent = 0
        self.held_writes_refused = 0
        self.client_connections_open = 0
        self.client_connections_total = 0
        self.bytes_received = 0  # from clients (request bytes as read, framing included)
        self.bytes_sent = 0  # to clients
        # Control plane: owned by whichever process runs the config source.
        self.reloads: dict[str, int] = {"applied": 0, "rejected": 0, "unchanged": 0, "missing": 0}
        self.last_reload_success: float | None = None
        self.handoffs: dict[str, int] = {"committed": 0, "rolled_back": 0}  # ended as the leader
        self.handoff_seconds = 0.0  # their fence phases' durations, summed
        self.topology_swaps = 0
        self.worker_restarts = 0
        self.workers_ready: int | None = None  # set by the supervisor of --workers N

    # -- hot path -----------------------------------------------------------------------------

    def route(self, group: str, write: bool) -> RouteStats:
        table = self.write_routes if write else self.read_routes
        stats = table.get(group)
        if stats is None:
            stats = table[group] = RouteStats()
        return stats

    def response_headers(self, group: str) -> Histogram:
        """Upstream latency: request sent -> response headers received, per group."""
        histogram = self._response_headers.get(group)
        if histogram is None:
            histogram = self._response_headers[group] = Histogram()
        return histogram

    def connect(self, group: str) -> Histogram:
        histogram = self._connect.get(group)
        if histogram is None:
            histogram = self._connect[group] = Histogram()
        return histogram

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def rate_limited(self, limit: str) -> None:
        self.rate_limits[limit] = self.rate_limits.get(limit, 0) + 1

    def rate_limit_fallback(self, reason: str) -> None:
        self.rate_limit_fallbacks[reason] = self.rate_limit_fallbacks.get(reason, 0) + 1

    def ejected(self, group: str, reason: str) -> None:
        key = f"{group} {reason}"  # (a group name has no space)
        self.ejections[key] = self.ejections.get(key, 0) + 1

    # -- control plane ------------------------------------------------------------------------

    def handoff_ended(self, outcome: str, seconds: float) -> None:
        """A hand-off this replica ended as the leader ("committed" or "rolled_back")."""
        self.handoffs[outcome] = self.handoffs.get(outcome, 0) + 1
        self.handoff_seconds += seconds

    def reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1
        if result in ("applied", "unchanged"):
            self.last_reload_success = time.time()

    # -- across processes ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain-data copy of the data-plane counters, for another process to merge."""
        return {
            "routes": [[g, kind, s.codes, s.duration.dump()] for g, kind, s in self.routes()],
            "connect": {g: h.dump() for g, h in self._connect.items()},
            "response_headers": {g: h.dump() for g, h in self._response_headers.items()},
            "loop_lag": self.loop_lag.dump(),
            "refusals": dict(self.refusals),
            "ejections": dict(self.ejections),
            "rate_limits": dict(self.rate_limits),
            "rate_limit_fallbacks": dict(self.rate_limit_fallbacks),
            "counters": {name: getattr(self, name) for name in self._SUMMED},
        }

    def reset_data_plane(self) -> None:
        """Zero what ``merge`` adds up, keeping control-plane counters (reloads, swaps)."""
        self.read_routes.clear()
        self.write_routes.clear()
        self._connect.clear()
        self._response_headers.clear()
        self.loop_lag = Histogram(LAG_BOUNDS)
        self.refusals.clear()
        self.ejections.clear()
        self.rate_limits.clear()
        self.rate_limit_fallbacks.clear()
        for name in self._SUMMED:
            setattr(self, name, 0)

    def merge(self, snapshot: dict[str, Any]) -> None:
        """Add a worker's ``snapshot`` into this (supervisor-side) object."""
        for group, kind, codes, duration in snapshot["routes"]:
            stats = self.route(group, kind == "write")
            stats.codes = [a + b for a, b in zip(stats.codes, codes, strict=True)]
            stats.duration.add(duration)
        for group, dumped in snapshot["connect"].items():
            self.connect(group).add(dumped)
        for group, dumped in snapshot["response_headers"].items():
            self.response_headers(group).add(dumped)
        self.loop_lag.add(snapshot["loop_lag"])
        for reason, value in snapshot["refusals"].items():
            self.refusals[reason] = self.refusals.get(reason, 0) + value
        for key, value in snapshot.get("ejections", {}).items():
            self.ejections[key] = self.ejections.get(key, 0) + value
        for table in ("rate_limits", "rate_limit_fallbacks"):
            mine: dict[str, int] = getattr(self, table)
            for key, value in snapshot.get(table, {}).items():
                mine[key] = mine.get(key, 0) + value
        for name, value in snapshot["counters"].items():
            setattr(self, name, getattr(self, name) + value)

    def routes(self) -> Iterator[tuple[str, str, RouteStats]]:
        for group, stats in self.read_routes.items():
            yield group, "read", stats
        for group, stats in self.write_routes.items():
            yield group, "write", stats


class GatewayCollector(Collector):
    """Builds the shardgate_* families from ``Metrics`` and the current topology at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        topology: Callable[[], Topology | None],
        watches: Callable[[], Iterable[WatchView]] = tuple,
        pod_stats: PodStats = unpooled_stats,
        pod_health: PodHealthView = no_health,
    ) -> None:
        self._metrics = metrics
        self._topology = topology
        self._pod_health = pod_health
        self._watches = watches
        self._pod_stats = pod_stats

    def collect(self) -> Iterator[Any]:
        yield from self._requests()
        yield from self._upstreams()
        yield from self._process()
        yield from self._config()
        yield from self._discovery()
        yield from self._pods()

    def _requests(self) -> Iterator[Any]:
        m = self._metrics
        requests = CounterMetricFamily(
            "shardgate_requests",
            "Requests answered, by group (the owner group, or the serving pod's group for reads to"
            " any pod; 'none' when refused before a group was known), kind and status class.",
            labels=["group", "kind", "code_class"],
        )
        duration = HistogramMetricFamily(
            "shardgate_request_duration_seconds",
            "Time from request headers received to response complete.",
            labels=["group", "kind"],
        )
        for group, kind, stats in m.routes():
            for code_class, value in zip(CODE_CLASSES, stats.codes, strict=True):
                requests.add_metric([group, kind, code_class], value)
            duration.add_metric([group, kind], *stats.duration.family_value())
        yield requests
        yield duration
        ejections = CounterMetricFamily(
            "shardgate_pod_ejections",
            "Pods ejected by passive health checks (no new request until the ejection ends), by"
            " group and reason: connect_failure, connect_timeout, reset, timeout, consecutive_5xx.",
            labels=["group", "reason"],
        )
        for key, value in sorted(m.ejections.items()):
            ejections.add_metric(key.split(" ", 1), value)
        yield ejections
        yield from self._rate_limits()
        refusals = CounterMetricFamily(
            "shardgate_refusals",
            "Requests the gateway answered itself with an error, by reason (the error code).",
            labels=["reason"],
        )
        for reason, value in sorted(m.refusals.items()):
            refusals.add_metric([reason], value)
        yield refusals
        yield CounterMetricFamily(
            "shardgate_received_bytes", "Bytes read from clients.", value=m.bytes_received
        )
        yield CounterMetricFamily("shardgate_sent_bytes", "Bytes written to clients.", value=m.bytes_sent)

    def _rate_limits(self) -> Iterator[Any]:
        m = self._metrics
        yield _labelled(
            "shardgate_rate_limited_requests",
            "Requests answered 429 rate_limited, by the limit whose bucket was empty: global,"
            " per_group, per_key.",
            "limit",
            dict(sorted(m.rate_limits.items())),
        )
        yield _labelled(
            "shardgate_rate_limit_fallbacks",
            "Per-key limits the local bucket decided although limits.redis_url names a Redis"
            " server (fail open), by reason: timeout, error, unavailable.",
            "reason",
            dict(sorted(m.rate_limit_fallbacks.items())),
        )

    def _upstreams(self) -> Iterator[Any]:
        m = self._metrics
        for name, help_text, table in (
            (
                "shardgate_upstream_connect_duration_seconds",
                "Time to open an upstream connection.",
                m._connect,
            ),
            (
                "shardgate_upstream_response_header_duration_seconds",
                "Time from request sent to upstream response headers received.",
                m._response_headers,
            ),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["group"])
            for group, histogram in table.items():
                family.add_metric([group], *histogram.family_value())
            yield family
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
            "Requests tried again on another pod (never a write after a byte of it was sent).",
            value=m.upstream_retries,
        )
        yield CounterMetricFamily(
            "shardgate_retry_budget_exhausted",
            "Reads a pod failed (reset, or answered 502/503/504) that were not tried again because"
            " the retry budget had no room (retries are at most 20% of the requests, in flight and"
            " over time): the pod's failure was the answer.",
            value=m.retry_budget_exhausted,
        )
        yield _by_outcome(
            "shardgate_fenced_writes",
            "Writes a fenced pod answered 421 (its handler did not run; never passed on), by what "
            "the gateway did: resent to the owner in its newest view, held for a newer one (see "
            "shardgate_held_writes_total), or refused 503 shard_moving.",
            {
                "resent": m.fenced_writes_resent,
                "held": m.fenced_writes_held,
                "refused": m.fenced_writes_refused,
            },
        )
        yield _by_outcome(
            "shardgate_held_writes",
            "Writes for moving keys held during a hand-off's fence phase (or after a fence's 421), "
            "by how the hold ended: "
            "sent to the key's owner on a newer view, or refused 503 shard_moving at the hold's end.",
            {"sent": m.held_writes_sent, "refused": m.held_writes_refused},
        )

    def _process(self) -> Iterator[Any]:
        m = self._metrics
        yield GaugeMetricFamily(
            "shardgate_client_connections", "Open client connections.", value=m.client_connections_open
        )
        yield CounterMetricFamily(
            "shardgate_client_connections_accepted",
            "Client connections accepted.",
            value=m.client_connections_total,
        )
        lag = HistogramMetricFamily(
            "shardgate_event_loop_lag_seconds",
            "How late the event loop ran the periodic deadline sweep (each data-plane process).",
        )
        lag.add_metric([], *m.loop_lag.family_value())
        yield lag
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

    def _config(self) -> Iterator[Any]:
        m = self._metrics
        reloads = CounterMetricFamily(
            "shardgate_config_reloads",
            "Shard config loads by result (applied, unchanged, rejected, missing).",
            labels=["result"],
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
            "shardgate_topology_swaps", "Topology snapshots swapped in.", value=m.topology_swaps
        )
        yield _by_outcome(
            "shardgate_handoffs",
            "Hand-offs this replica ended as the leader, by outcome (committed, rolled_back).",
            dict(sorted(m.handoffs.items())),
        )
        yield CounterMetricFamily(
            "shardgate_handoff_fence_seconds",
            "Seconds the fence phases of those hand-offs lasted, summed (divided by"
            " shardgate_handoffs_total: their mean duration).",
            value=m.handoff_seconds,
        )
        topology = self._topology()
        if topology is None:
            return
        yield InfoMetricFamily(
            "shardgate_config_epoch", "The shard config epoch in force.", value={"epoch": topology.epoch}
        )
        yield GaugeMetricFamily("shardgate_ring_groups", "Groups on the ring.", value=len(topology.groups))
        yield GaugeMetricFamily("shardgate_ring_points", "Points on the ring.", value=topology.ring.points)
        if topology.generation is not None:
            yield GaugeMetricFamily(
                "shardgate_shard_state_generation",
                "Generation of the shard state this replica routes on.",
                value=topology.generation,
            )
        yield GaugeMetricFamily(
            "shardgate_handoff_fencing",
            "1 while the shard state this replica routes on is a hand-off's fence phase (writes for"
            " moving keys refused), else 0.",
            value=int(topology.handoff is not None),
        )
        yield GaugeMetricFamily(
            "shardgate_shard_state_unconfirmed",
            "1 while no direct read has confirmed this replica's view of the shard state within"
            " its lease (writes refused: 503 shard_state_unconfirmed), else 0.",
            value=int(topology.unconfirmed),
        )

    def _pods(self) -> Iterator[Any]:
        topology = self._topology()
        if topology is None:
            return
        pods = GaugeMetricFamily(
            "shardgate_group_pods", "Pods per group by state.", labels=["group", "state"]
        )
        inflight = GaugeMetricFamily(
            "shardgate_pod_inflight_requests", "Requests in flight per pod.", labels=["group", "pod"]
        )
        connections = GaugeMetricFamily(
            "shardgate_pod_upstream_connections",
            "Open upstream connections per pod, idle (pooled) or busy.",
            labels=["group", "pod", "state"],
        )
        health = GaugeMetricFamily(
            "shardgate_group_pods_by_health",
            "Ready pods per group by passive health: healthy, ejected (no new request), trial (one"
            " request decides). With --workers a pod one worker ejected counts as ejected.",
            labels=["group", "health"],
        )
        for group in topology.groups.values():
            by_health = dict.fromkeys((HEALTHY, EJECTED, TRIAL), 0)
            for pod in group.ready:
                by_health[str(self._pod_health(pod)["health"])] += 1
            for name, value in by_health.items():
                health.add_metric([group.name, name], value)
            states = dict.fromkeys((PodState.READY, PodState.NOT_READY, PodState.TERMINATING), 0)
            for pod in group.pods:
                if pod.state in states:
                    states[pod.state] += 1
                in_flight, open_connections, idle = self._pod_stats(pod)
                inflight.add_metric([group.name, pod.address], in_flight)
                connections.add_metric([group.name, pod.address, "idle"], idle)
                connections.add_metric([group.name, pod.address, "busy"], open_connections - idle)
            for state, value in states.items():
                pods.add_metric([group.name, str(state)], value)
        yield pods
        yield inflight
        yield connections
        yield health

    def _discovery(self) -> Iterator[Any]:
        watches = list(self._watches())
        if not watches:
            return
        up = GaugeMetricFamily(
            "shardgate_discovery_watch_up",
            "1 while the watch reaches the API server; 0 while routing on the last known state.",
            labels=["resource"],
        )
        state = GaugeMetricFamily(
            "shardgate_discovery_watch_state",
            "1 for the state each watch is in (listing, watching, backoff, stopped).",
            labels=["resource", "state"],
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
            for name in ("listing", "watching", "backoff", "stopped"):
                state.add_metric([watch.resource, name], 1.0 if watch.state == name else 0.0)
            reconnects.add_metric([watch.resource], watch.reconnects)
            relists.add_metric([watch.resource], watch.relists)
            if watch.last_event_at is not None:
                age.add_metric([watch.resource], max(0.0, now - watch.last_event_at))
        yield up
        yield state
        yield reconnects
        yield relists
        yield age


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _by_outcome(name: str, documentation: str, counts: dict[str, float]) -> CounterMetricFamily:
    """A counter family with one ``outcome`` label, a sample per entry of ``counts``."""
    return _labelled(name, documentation, "outcome", counts)


def _labelled(name: str, documentation: str, label: str, counts: dict[str, float]) -> CounterMetricFamily:
    """A counter family with one label, a sample per entry of ``counts``."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value_of_label, value in counts.items():
        family.add_metric([value_of_label], value)
    return family
