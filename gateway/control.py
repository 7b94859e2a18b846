"""The control plane of a gateway: config source, discovery, topology snapshots, counters."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gateway.coordination import file_coordinator, kubernetes_coordinator
from gateway.discovery.static import StaticFileSource
from gateway.observability.metrics import Metrics
from gateway.settings import Settings
from gateway.shardstate import state_file_path
from gateway.tasks import log_if_it_fails
from gateway.topology import Topology, TopologyBuilder, TopologyHolder

if TYPE_CHECKING:  # the kubernetes client costs ~36 MB of memory: imported only when used
    from gateway.discovery.kubernetes import KubernetesSource, WatchStatus

log = logging.getLogger("shardgate.control")

CONFIG_POLL_INTERVAL = 1.0  # how often a config file is checked for changes (seconds)


class ControlPlane:
    """One replica's control plane. The desired config (the file or the ConfigMap the operator
    edits) goes to the hand-off coordinator; what the replica routes on is the shard state the
    coordinator's leader writes (docs/design/014-ownership-handoff.md)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.holder = TopologyHolder()
        self.builder = TopologyBuilder()
        self.holder.subscribe(self._count_swap)
        self.watches: Callable[[], Iterable[WatchStatus]] = tuple
        self.source: StaticFileSource | KubernetesSource
        self._coordinator_start: asyncio.Task[None] | None = None
        if settings.config_path is not None:
            state_path = settings.state_path or state_file_path(settings.config_path)
            files = StaticFileSource(
                settings.config_path,
                self.builder,
                self.holder,
                self.metrics,
                CONFIG_POLL_INTERVAL,
                state_path=state_path,
                on_desired=self._desired_changed,
            )
            self.source = files
            self.coordinator = file_coordinator(
                settings.config_path,
                settings.identity,
                lambda: files.desired_text,
                self.pods_of,
                state_path=state_path,
                on_handoff=self.metrics.handoff_ended,
            )
        else:
            from gateway.discovery.kubernetes import KubernetesSource, WatchTiming, load_api_client

            assert settings.configmap is not None
            api_factory = functools.partial(load_api_client, settings.service_account_dir)
            kube = KubernetesSource(
                settings.configmap,
                settings.namespace,
                self.builder,
                self.holder,
                self.metrics,
                api_factory=api_factory,
                timing=WatchTiming(
                    watch_timeout=settings.watch_timeout, backoff_max=settings.watch_backoff_max
                ),
                follow_state=True,
                on_desired=self._desired_changed,
            )
            self.source = kube
            self.watches = kube.watch_statuses
            self.coordinator = kubernetes_coordinator(
                api_factory,
                settings.namespace,
                settings.configmap,
                settings.identity,
                lambda: kube.desired_text,
                self.pods_of,
                on_handoff=self.metrics.handoff_ended,
            )
        follower = self.source.follower
        if follower is not None:
            # Past its lease the replica refuses writes itself (its view may be stale).
            self.holder.expect_confirmation()
            follower.subscribe_confirmation(self.holder.set_confirmed)

    def describe_source(self) -> dict[str, object]:
        """/debug/ring's ``config``: the source's status, the shard state in force, the hand-off."""
        source = self.source
        data = source.status.describe() if isinstance(source, StaticFileSource) else source.describe()
        current = self.holder.current
        data["generation"] = current.generation if current is not None else None
        follower = source.follower
        if follower is not None:
            at = follower.confirmed_at
            # Past the lease this replica refuses writes (503 shard_state_unconfirmed).
            holder = self.holder
            data["state_confirmed"] = not (holder.unconfirmed or holder.awaiting_confirmation)
            data["state_confirmed_age"] = round(time.monotonic() - at, 3) if at is not None else None
        data["handoff"] = self.coordinator.describe()
        return data

    def pods_of(self, group: str) -> list[str]:
        """Every pod the replica knows of ``group`` in the config in force, whatever its state (a
        not-ready or terminating pod can still take a write a stale gateway sends it)."""
        current = self.holder.current
        view = current.groups.get(group) if current is not None else None
        return [pod.address for pod in view.pods] if view is not None else []

    def load_initial(self) -> None:
        """A config file must be valid at start (an operator error: fail fast). A ConfigMap may
        not exist yet: readiness says 503 until it does."""
        if isinstance(self.source, StaticFileSource):
            self.source.load_initial()

    def start(self) -> None:
        self.source.start()
        started = asyncio.get_running_loop().create_task(self.coordinator.start())
        self._coordinator_start = log_if_it_fails(started, "starting the hand-off coordinator", log)

    async def stop(self) -> None:
        if self._coordinator_start is not None:
            await asyncio.gather(self._coordinator_start, return_exceptions=True)
        await self.coordinator.stop()
        await self.source.stop()

    def reload(self) -> None:
        self.source.reload(force=True)
        self.coordinator.desired_changed()

    @property
    def current(self) -> Topology | None:
        return self.holder.current

    def _desired_changed(self) -> None:
        self.coordinator.desired_changed()

    def report(self, generation: int | None, moving_in_flight: int) -> None:
        """Tell the barrier which shard state this replica's data plane routes on (with
        ``--workers``: the oldest any worker routes on) and how many of its writes in flight are
        for keys moving under it (gateway.proxy.plane.BarrierReports)."""
        registry = self.coordinator.registry
        if registry is not None:
            registry.report(generation, moving_in_flight)

    def read_state_soon(self) -> None:
        """Read the shard state now: a fenced pod refused a write, so a newer one exists."""
        follower = self.source.follower
        if follower is not None:
            follower.read_soon()

    def _count_swap(self, topology: Topology) -> None:
        self.metrics.topology_swaps += 1
