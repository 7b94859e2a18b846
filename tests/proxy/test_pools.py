"""The data plane's pools follow the topology: a pod that leaves the eligible set (not ready,
terminating, removed, or its group gone) has its idle connections closed at the swap, once;
busy ones are left to finish; a pod that comes back keeps its pool."""

from __future__ import annotations

from typing import Any

from gateway.config import parse_shard_config
from gateway.observability.metrics import Metrics
from gateway.proxy.pool import Pools
from gateway.topology import DiscoveredPod, Pod, PodState, TopologyBuilder, TopologyHolder

CONFIG = """
version: 1
groups:
  - {name: group-1, service: svc-1, port: 8080}
  - {name: group-2, service: svc-2, port: 8080}
"""


class IdleConnection:
    """Stands in for a pooled UpstreamConnection: counts how often it is closed."""

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class Setup:
    def __init__(self) -> None:
        self.config = parse_shard_config(CONFIG)
        self.builder = TopologyBuilder()
        self.holder = TopologyHolder(log_changes=False)
        self.pools = Pools(Metrics())
        self.holder.subscribe(self.pools.on_topology)

    def swap(
        self, group_1: list[DiscoveredPod], group_2: list[DiscoveredPod] | None = None, config: Any = None
    ) -> None:
        pods = {"group-1": group_1, "group-2": group_2 or []}
        self.holder.swap(self.builder.build(config or self.config, pods))

    def pod(self, group: str, index: int = 0) -> Pod:
        assert self.holder.current is not None
        return self.holder.current.groups[group].pods[index]

    def pool(self, pod: Pod, count: int = 2) -> list[IdleConnection]:
        idle = [IdleConnection() for _ in range(count)]
        self.pools.link(pod).idle.extend(idle)  # type: ignore[arg-type]
        return idle


def ready(host: str, state: PodState = PodState.READY) -> DiscoveredPod:
    return DiscoveredPod(host, 8080, state)


def test_a_pod_leaving_the_ready_set_has_its_idle_connections_closed_once() -> None:
    setup = Setup()
    setup.swap([ready("10.0.0.1"), ready("10.0.0.2")])
    leaving, staying = setup.pod("group-1", 0), setup.pod("group-1", 1)
    closed, kept = setup.pool(leaving), setup.pool(staying)
    setup.swap([ready("10.0.0.1", PodState.TERMINATING), ready("10.0.0.2")])
    assert [c.closes for c in closed] == [1, 1]
    assert [c.closes for c in kept] == [0, 0] and len(setup.pools.link(staying).idle) == 2
    setup.swap([ready("10.0.0.2")])  # then removed: nothing is closed twice
    assert [c.closes for c in closed] == [1, 1]
    assert leaving.state is PodState.REMOVED


def test_pods_of_a_removed_group_have_their_idle_connections_closed() -> None:
    setup = Setup()
    setup.swap([ready("10.0.0.1")], [ready("10.0.0.5")])
    victim = setup.pod("group-2")
    closed = setup.pool(victim)
    setup.swap(
        [ready("10.0.0.1")], [ready("10.0.0.5")], parse_shard_config(CONFIG.split("  - {name: group-2")[0])
    )
    assert [c.closes for c in closed] == [1, 1]
    assert setup.pools.stats(victim) == (0, 0, 0)


def test_a_pod_that_comes_back_ready_keeps_its_pool() -> None:
    setup = Setup()
    setup.swap([ready("10.0.0.1", PodState.NOT_READY)])
    target = setup.pod("group-1")
    setup.swap([ready("10.0.0.1")])
    idle = setup.pool(target)
    setup.swap([ready("10.0.0.1")])
    assert [c.closes for c in idle] == [0, 0]
    assert setup.pools.stats(target) == (0, 0, 2)
