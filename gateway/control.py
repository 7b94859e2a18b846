"""The control plane of a gateway: config source, discovery, topology snapshots, counters."""

from __future__ import annotations

import asyncio
import functools
import logging
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
        self.holder.subscribe(self._report_generation)

    def describe_source(self) -> dict[str, object]:
        """/debug/ring's ``config``: the source's status, the shard state in force, the hand-off."""
        source = self.source
        data = source.status.describe() if isinstance(source, StaticFileSource) else source.describe()
        current = self.holder.current
        data["generation"] = current.generation if current is not None else None
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

    def _report_generation(self, topology: Topology) -> None:
        """Tell the barrier which shard state this replica routes on. It refuses writes for moving
        keys at once, so it has none of them in flight once it holds a fencing state."""
        registry = self.coordinator.registry
        if registry is not None:
            registry.report(topology.generation, 0)

    def _count_swap(self, topology: Topology) -> None:
        self.metrics.topology_swaps += 1
