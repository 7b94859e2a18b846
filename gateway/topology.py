"""Immutable topology snapshots: config + ring + pods per group, swapped atomically.

Discovery produces ``DiscoveredPod`` lists per group; ``TopologyBuilder`` turns them into a
``Topology`` snapshot that the data plane reads without locks (one attribute read per request).
``Pod`` objects are the one mutable, long-lived part: they carry the pod's state and load (the
in-flight counter), so the builder reuses them across snapshots for the same address. What
only the data plane needs of a pod (its connection pool) the data plane keeps itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.config import ShardConfig
from gateway.ring import ShardRing, config_epoch

log = logging.getLogger("shardgate.topology")


class PodState(StrEnum):
    READY = "ready"
    NOT_READY = "not_ready"
    TERMINATING = "terminating"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class DiscoveredPod:
    host: str
    port: int
    state: PodState = PodState.READY
    name: str | None = None  # pod name (EndpointSlice targetRef), for debug output


class Pod:
    """A pod address inside one group. Identity: (group, host, port)."""

    __slots__ = (
        "address",
        "ejected",
        "group",
        "host",
        "inflight",
        "name",
        "port",
        "requests",
        "state",
        "trial",
    )

    def __init__(self, group: str, host: str, port: int) -> None:
        self.group = group
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.name: str | None = None
        self.state = PodState.READY
        self.inflight = 0  # requests being proxied to this pod now
        self.requests = 0  # requests ever sent (for debug and tests)
        # Passive health (gateway.proxy.health): ejected pods get no new request; a pod on
        # trial gets one (and is ejected meanwhile, so that it gets only one).
        self.ejected = False
        self.trial = False

    @property
    def eligible(self) -> bool:
        """Whether it may take a new request: ready, and not ejected."""
        return self.state is PodState.READY and not self.ejected

    def __repr__(self) -> str:
        return f"Pod({self.group}, {self.address}, {self.state})"


# The data plane's view of a pod: (in-flight requests, open upstream connections, idle ones).
PodStats = Callable[[Pod], tuple[int, int, int]]


# The data plane's view of a pod's passive health, for /debug/ring (gateway.proxy.health).
PodHealthView = Callable[[Pod], dict[str, object]]


HEALTHY, EJECTED, TRIAL = "healthy", "ejected", "trial"


def health_of(pod: Pod) -> str:
    """What passive health makes of the pod now (a pod on trial with its trial request under
    way is ``ejected`` meanwhile too, but says ``trial``)."""
    return TRIAL if pod.trial else EJECTED if pod.ejected else HEALTHY


def no_health(pod: Pod) -> dict[str, object]:
    """Where no data plane runs, or no record of it is kept: what the Pod itself says."""
    return {"health": health_of(pod)}


def unpooled_stats(pod: Pod) -> tuple[int, int, int]:
    """Pod stats where no data plane runs (the supervisor of --workers N, tools)."""
    return pod.inflight, 0, 0


class Decision:
    """Where a request may go: ``candidates`` is the whole allowed set (used again on retry).

    Immutable and shared: a snapshot holds one per group and kind, built with it, so routing
    a request allocates nothing.
    """

    __slots__ = ("candidates", "group", "is_write")

    def __init__(self, is_write: bool, group: str | None, candidates: tuple[Pod, ...]) -> None:
        self.is_write = is_write
        self.group = group  # owner group for writes and owner reads; None for "any pod" reads
        self.candidates = candidates


class Handoff:
    """A hand-off under way (the shard state is fencing): the topology of the config being
    handed to, so that a write's key can be found moving. Keys whose owner is the same in both
    configs route as before; a moving key belongs to nobody until the hand-off ends
    (docs/design/014-ownership-handoff.md)."""

    __slots__ = ("every_key_moves", "generation", "incoming")

    def __init__(self, generation: int, incoming: Topology, every_key_moves: bool) -> None:
        self.generation = generation
        self.incoming = incoming
        self.every_key_moves = every_key_moves  # the two configs read keys or writes differently


@dataclass(frozen=True, slots=True)
class GroupView:
    name: str
    weight: int
    source: str  # "endpoints" or "service:<name>"
    pods: tuple[Pod, ...]
    ready: tuple[Pod, ...]
    write_decision: Decision
    read_decision: Decision


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything the router needs for one request, precomputed in the forms it compares."""

    config: ShardConfig
    ring: ShardRing
    epoch: str
    groups: Mapping[str, GroupView]
    ready: tuple[Pod, ...]  # every ready pod of every group (reads: any)
    key_header: bytes  # lower-case header names, as the parser hands them over
    operation_header: bytes | None
    write_methods: frozenset[bytes]
    reads: str
    any_read: Decision  # a read that may go to any ready pod of any group
    epoch_bytes: bytes
    created: float = field(default_factory=time.time)
    # The data plane's cache: raw field name -> what to do with it (gateway.proxy.request_head).
    header_actions: dict[bytes, int] = field(default_factory=dict)
    generation: int | None = None  # the shard state's generation this snapshot routes on
    handoff: Handoff | None = None  # while the shard state is fencing
    # The replica's view of the shard state is past its lease (no direct read confirmed it):
    # writes are refused, 503 shard_state_unconfirmed. Stamped by the TopologyHolder.
    unconfirmed: bool = False

    def describe(self, pod_stats: PodStats, pod_health: PodHealthView = no_health) -> dict[str, object]:
        """JSON-ready view for /debug/ring; ``pod_stats`` gives the data plane's view of a pod
        (in-flight requests, open upstream connections, idle ones), ``pod_health`` its passive
        health (gateway.proxy.health)."""
        shares = self.ring.share_by_group()
        return {
            "epoch": self.epoch,
            "created": self.created,
            "routing": self.config.routing.model_dump(mode="json"),
            "ring": {**self.ring.stats(), "vnodes": self.config.ring.vnodes, "share": shares},
            "groups": [
                {
                    "name": g.name,
                    "weight": g.weight,
                    "source": g.source,
                    "ready_pods": len(g.ready),
                    "pods": [{**_describe_pod(p, pod_stats(p)), **pod_health(p)} for p in g.pods],
                }
                for g in self.groups.values()
            ],
        }


def _describe_pod(pod: Pod, stats: tuple[int, int, int]) -> dict[str, object]:
    inflight, connections, idle = stats
    return {
        "address": pod.address,
        "name": pod.name,
        "state": str(pod.state),
        "inflight": inflight,
        "connections": connections,
        "idle_connections": idle,
        "requests": pod.requests,
    }


class TopologyBuilder:
    """Builds snapshots, reusing Pod objects and the ring when they are unchanged."""

    def __init__(self) -> None:
        self._pods: dict[tuple[str, str, int], Pod] = {}
        self._ring: ShardRing | None = None
        self._ring_inputs: object = None

    @staticmethod
    def _ring_inputs_of(config: ShardConfig) -> object:
        return (config.ring.vnodes, tuple((g.name, g.weight) for g in config.groups))

    def needs_ring(self, config: ShardConfig) -> bool:
        """Whether ``config`` changes the ring (group set, weights, vnodes), not just pods."""
        return self._ring is None or self._ring_inputs_of(config) != self._ring_inputs

    @classmethod
    def same_ring(cls, a: ShardConfig, b: ShardConfig) -> bool:
        """Whether a ring built for ``a`` is the ring of ``b`` too."""
        return bool(cls._ring_inputs_of(a) == cls._ring_inputs_of(b))

    def build(
        self,
        config: ShardConfig,
        discovered: Mapping[str, Iterable[DiscoveredPod]] | None = None,
        ring: ShardRing | None = None,
        *,
        generation: int | None = None,
        handoff: Handoff | None = None,
    ) -> Topology:
        """Snapshot for ``config``; ``discovered`` gives pods of ``service:`` groups by group name.

        ``ring`` is a ring for ``config`` built beforehand (off the event loop: a large ring
        takes a couple of hundred milliseconds); without it one is built here if needed.
        """
        discovered = discovered or {}
        if ring is not None:
            self._ring, self._ring_inputs = ring, self._ring_inputs_of(config)
        elif self.needs_ring(config):
            self._ring, self._ring_inputs = ShardRing(config), self._ring_inputs_of(config)
        seen: set[tuple[str, str, int]] = set()
        groups: dict[str, GroupView] = {}
        all_ready: list[Pod] = []
        for group in config.groups:
            if group.endpoints is not None:
                found = [DiscoveredPod(host, port) for host, port in group.addresses]
                source = "endpoints"
            else:
                found = list(discovered.get(group.name, ()))
                source = f"service:{group.service}"
            pods: list[Pod] = []
            for item in found:
                ident = (group.name, item.host, item.port)
                if ident in seen:
                    continue  # the same endpoint reported twice (e.g. two slices) counts once
                seen.add(ident)
                pod = self._pods.get(ident)
                if pod is None:
                    pod = self._pods[ident] = Pod(group.name, item.host, item.port)
                pod.name = item.name
                pod.state = item.state
                pods.append(pod)
            ready = tuple(p for p in pods if p.state is PodState.READY)
            all_ready.extend(ready)
            groups[group.name] = GroupView(
                group.name,
                group.weight,
                source,
                tuple(pods),
                ready,
                Decision(True, group.name, ready),
                Decision(False, group.name, ready),
            )
        for ident in [i for i in self._pods if i not in seen]:
            self._pods.pop(ident).state = PodState.REMOVED
        assert self._ring is not None  # built above when there was none
        routing = config.routing
        epoch = config_epoch(config)
        return Topology(
            config=config,
            ring=self._ring,
            epoch=epoch,
            groups=groups,
            ready=tuple(all_ready),
            key_header=routing.key_header.lower().encode(),
            operation_header=routing.operation_header.lower().encode() if routing.operation_header else None,
            write_methods=frozenset(m.encode() for m in routing.write_methods),
            reads=routing.reads,
            any_read=Decision(False, None, tuple(all_ready)),
            epoch_bytes=epoch.encode(),
            generation=generation,
            handoff=handoff,
        )


class TopologyHolder:
    """The current snapshot plus change listeners; the data plane reads ``.current``."""

    def __init__(self, log_changes: bool = True) -> None:
        self._log_changes = log_changes
        self.current: Topology | None = None
        self.swaps = 0
        self._listeners: list[Callable[[Topology], None]] = []
        # Whether the view of the shard state is past its lease (every snapshot swapped in says
        # so), and whether its first confirmation is still awaited (readiness waits for it).
        self.unconfirmed = False
        self.awaiting_confirmation = False

    def expect_confirmation(self) -> None:
        """A shard state is followed: not ready until a direct read first confirms a view."""
        self.awaiting_confirmation = True

    def set_confirmed(self, confirmed: bool) -> None:
        """The replica's view of the shard state is within its lease (True), or not (False:
        the snapshot in force is swapped for one that refuses writes)."""
        if confirmed:
            self.awaiting_confirmation = False
        if self.unconfirmed != (not confirmed):
            self.note_unconfirmed(not confirmed)
            if self.current is not None:
                self.swap(self.current)

    def note_unconfirmed(self, unconfirmed: bool) -> None:
        """Set the flag the next snapshot swapped in is stamped with (a worker: the supervisor
        says so with each topology)."""
        self.unconfirmed = unconfirmed

    def subscribe(self, listener: Callable[[Topology], None]) -> None:
        self._listeners.append(listener)

    def swap(self, topology: Topology) -> None:
        if topology.unconfirmed != self.unconfirmed:
            topology = dataclasses.replace(topology, unconfirmed=self.unconfirmed)
        previous = self.current
        self.current = topology
        self.swaps += 1
        if self._log_changes and (previous is None or previous.epoch != topology.epoch):
            log.info(
                "topology epoch %s: %d groups, %d ready pods",
                topology.epoch,
                len(topology.groups),
                len(topology.ready),
            )
        for listener in self._listeners:
            listener(topology)
