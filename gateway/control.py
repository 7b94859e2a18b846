"""The control plane of a gateway: config source, discovery, topology snapshots, counters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.discovery.static import StaticFileSource
from gateway.observability.metrics import Metrics
from gateway.topology import Topology, TopologyBuilder, TopologyHolder

if TYPE_CHECKING:  # the kubernetes client costs ~36 MB of memory: imported only when used
    from gateway.discovery.kubernetes import KubernetesSource, WatchStatus


class ControlPlane:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.holder = TopologyHolder()
        self.builder = TopologyBuilder()
        self.holder.subscribe(self._count_swap)
        self.watches: Callable[[], Iterable[WatchStatus]] = tuple
        self.source: StaticFileSource | KubernetesSource
        if settings.config_path is not None:
            self.source = StaticFileSource(
                settings.config_path, self.builder, self.holder, self.metrics, settings.config_poll_interval
            )
            self.describe_source: Callable[[], dict[str, object]] = self.source.status.describe
        else:
            from gateway.discovery.kubernetes import KubernetesSource, WatchTiming

            assert settings.configmap is not None
            kube = KubernetesSource(
                settings.configmap,
                settings.namespace,
                self.builder,
                self.holder,
                self.metrics,
                timing=WatchTiming(
                    watch_timeout=settings.watch_timeout, backoff_max=settings.watch_backoff_max
                ),
            )
            self.source = kube
            self.describe_source = kube.describe
            self.watches = kube.watch_statuses

    def load_initial(self) -> None:
        """A config file must be valid at start (an operator error: fail fast). A ConfigMap may
        not exist yet: readiness says 503 until it does."""
        if isinstance(self.source, StaticFileSource):
            self.source.load_initial()

    def start(self) -> None:
        self.source.start()

    async def stop(self) -> None:
        await self.source.stop()

    def reload(self) -> None:
        self.source.reload(force=True)

    @property
    def current(self) -> Topology | None:
        return self.holder.current

    def _count_swap(self, topology: Topology) -> None:
        self.metrics.topology_swaps += 1
