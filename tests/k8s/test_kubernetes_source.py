"""``gateway.discovery.kubernetes`` in process: the EndpointSlice semantics, the source's watches
against the API-server double (real ``kubernetes`` client, real asyncio loop), coalescing of
endpoint bursts, and what one topology swap costs.

Run with ``-s`` to see the measured swap costs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import config as kube_config

from gateway.config import ShardConfig, parse_shard_config
from gateway.discovery.kubernetes import (
    KubernetesSource,
    WatchTiming,
    pod_state,
    pods_by_group,
    slice_port,
)
from gateway.observability.metrics import Metrics
from gateway.router import Decision, choose_pod, decide
from gateway.topology import DiscoveredPod, PodState, Topology, TopologyBuilder, TopologyHolder
from tests.k8s.apiserver import SERVICE_NAME_LABEL, FakeApiServer, endpoint, port
from tests.k8s.conftest import CONFIGMAP, NS, Group, Recipe, shard_config, wait_for

T = TypeVar("T")

TIMING = WatchTiming(
    watch_timeout=10.0, connect_timeout=2.0, list_timeout=5.0, backoff_initial=0.05, backoff_max=0.3
)


def slice_obj(
    name: str,
    service: str | None,
    endpoints: Sequence[Mapping[str, Any]],
    ports: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """An EndpointSlice as the watch hands it over (raw API dict)."""
    labels = {SERVICE_NAME_LABEL: service} if service is not None else {}
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "addressType": "IPv4",
        "endpoints": [dict(e) for e in endpoints],
        "ports": [dict(p) for p in ports] if ports is not None else [port(8080, "http")],
    }


def config_of(groups: Sequence[Mapping[str, Any]], vnodes: int = 160) -> ShardConfig:
    return ShardConfig.model_validate({"version": 1, "ring": {"vnodes": vnodes}, "groups": list(groups)})


def states(pods: Sequence[DiscoveredPod]) -> dict[str, PodState]:
    return {f"{p.host}:{p.port}": p.state for p in pods}


# ---------------------------------------------------------------------------------------------
# pod_state: EndpointConditions as the API documents them


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, PodState.READY),  # no conditions at all: nil ready means ready
        ({}, PodState.READY),
        ({"ready": None}, PodState.READY),
        ({"ready": None, "serving": None, "terminating": None}, PodState.READY),
        ({"ready": True}, PodState.READY),
        ({"ready": True, "serving": True, "terminating": False}, PodState.READY),
        ({"ready": False}, PodState.NOT_READY),
        ({"ready": False, "serving": False, "terminating": False}, PodState.NOT_READY),
        ({"ready": False, "terminating": None}, PodState.NOT_READY),
        # terminating wins over everything, also over a (buggy) ready=true
        ({"ready": True, "terminating": True}, PodState.TERMINATING),
        ({"ready": None, "terminating": True}, PodState.TERMINATING),
        # serving + terminating: the pod still answers, but must get no new requests
        ({"ready": False, "serving": True, "terminating": True}, PodState.TERMINATING),
        ({"ready": False, "serving": False, "terminating": True}, PodState.TERMINATING),
    ],
)
def test_pod_state(conditions: dict[str, Any] | None, expected: PodState) -> None:
    assert pod_state(conditions) is expected


@pytest.mark.timeout(10)
def test_serving_terminating_pod_gets_no_new_requests() -> None:
    config = config_of([{"name": "g1", "service": "svc-1", "port": "http"}])
    slices = {
        "s": slice_obj(
            "s",
            "svc-1",
            [
                endpoint("10.0.0.1"),
                endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
            ],
        )
    }
    found = pods_by_group(config, slices)
    assert states(found["g1"]) == {"10.0.0.1:8080": PodState.READY, "10.0.0.2:8080": PodState.TERMINATING}
    topology = TopologyBuilder().build(config, found)
    assert [p.address for p in topology.groups["g1"].ready] == ["10.0.0.1:8080"]
    chosen = set()
    for i in range(200):
        decision = decide(topology, b"POST", f"user-{i}".encode(), None)
        assert isinstance(decision, Decision), decision
        pod = choose_pod(decision.candidates)
        assert pod is not None
        chosen.add(pod.address)
    assert chosen == {"10.0.0.1:8080"}


# ---------------------------------------------------------------------------------------------
# slice_port: the group's port by name or number


HTTP_AND_METRICS = [port(8080, "http"), port(9090, "metrics")]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("ports", "wanted", "expected"),
    [
        (HTTP_AND_METRICS, "http", 8080),
        (HTTP_AND_METRICS, "metrics", 9090),
        (HTTP_AND_METRICS, 9090, 9090),
        (HTTP_AND_METRICS, 8080, 8080),
        (HTTP_AND_METRICS, "grpc", None),  # unknown name
        (HTTP_AND_METRICS, 7070, None),  # unknown number
        (HTTP_AND_METRICS, None, None),  # unset, but ambiguous
        ([port(8080, "http")], None, 8080),  # unset: the only port
        ([{"port": 8080, "protocol": "TCP"}], None, 8080),  # an unnamed single port
        ([{"port": 8080, "protocol": "TCP"}], "http", None),
        ([port(8080, "web")], 8080, 8080),  # a number matches whatever the port's name
        ([], "http", None),
        (None, "http", None),
        (None, None, None),
    ],
)
def test_slice_port(
    ports: list[dict[str, Any]] | None, wanted: int | str | None, expected: int | None
) -> None:
    assert slice_port(ports, wanted) == expected


# ---------------------------------------------------------------------------------------------
# pods_by_group: several slices per Service merged


MERGE_CONFIG = [
    {"name": "g1", "service": "svc-1", "port": "http"},
    {"name": "g2", "service": "svc-2", "port": 9000},
    {"name": "g3", "endpoints": ["127.0.0.1:7000"]},
]


@pytest.mark.timeout(10)
def test_pods_by_group_merges_slices_and_skips_what_does_not_fit() -> None:
    config = config_of(MERGE_CONFIG)
    slices = {
        "svc-1-a": slice_obj(
            "svc-1-a",
            "svc-1",
            [
                endpoint("10.0.0.1", pod="p1"),
                endpoint("10.0.0.2", ready=False),
                {"addresses": ["10.0.0.9"]},  # no conditions: ready
                {"addresses": [], "conditions": {"ready": True}},  # no address: skipped
            ],
        ),
        "svc-1-b": slice_obj(
            "svc-1-b",
            "svc-1",
            [
                endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                endpoint("10.0.0.4", "10.0.0.44"),  # several addresses: one endpoint (the first)
            ],
        ),
        # svc-1 slice without the wanted port (e.g. a slice of another port set): skipped
        "svc-1-c": slice_obj("svc-1-c", "svc-1", [endpoint("10.0.0.5")], [port(9090, "metrics")]),
        # g2 selects its port by number, the slice names it differently
        "svc-2-a": slice_obj("svc-2-a", "svc-2", [endpoint("10.0.1.1")], [port(9000, "web")]),
        "svc-2-b": slice_obj("svc-2-b", "svc-2", [endpoint("10.0.1.2")], [port(9001, "web2")]),
        # not one of ours
        "other": slice_obj("other", "svc-x", [endpoint("10.0.9.1")]),
        "unlabelled": slice_obj("unlabelled", None, [endpoint("10.0.9.2")]),
    }
    found = pods_by_group(config, slices)
    assert set(found) == {"g1", "g2"}  # fixed-endpoint groups are not discovered
    assert states(found["g1"]) == {
        "10.0.0.1:8080": PodState.READY,
        "10.0.0.2:8080": PodState.NOT_READY,
        "10.0.0.9:8080": PodState.READY,
        "10.0.0.3:8080": PodState.TERMINATING,
        "10.0.0.4:8080": PodState.READY,
    }
    assert states(found["g2"]) == {"10.0.1.1:9000": PodState.READY}
    names = {f"{p.host}": p.name for p in found["g1"]}
    assert names["10.0.0.1"] == "p1"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("ready_first", [True, False])
def test_endpoint_in_two_slices_counts_once_in_its_most_available_state(ready_first: bool) -> None:
    config = config_of(MERGE_CONFIG[:1])
    ready = slice_obj("a", "svc-1", [endpoint("10.0.0.1"), endpoint("10.0.0.2")])
    stale = slice_obj("b", "svc-1", [endpoint("10.0.0.1", ready=False), endpoint("10.0.0.3", ready=False)])
    ordered = [("a", ready), ("b", stale)] if ready_first else [("b", stale), ("a", ready)]
    found = pods_by_group(config, dict(ordered))["g1"]
    assert len(found) == 3, found
    assert states(found) == {
        "10.0.0.1:8080": PodState.READY,
        "10.0.0.2:8080": PodState.READY,
        "10.0.0.3:8080": PodState.NOT_READY,
    }
    # terminating beats not-ready (still finishing work, never new requests either way)
    terminating = slice_obj("c", "svc-1", [endpoint("10.0.0.3", ready=False, terminating=True)])
    found = pods_by_group(config, {"b": stale, "c": terminating})["g1"]
    assert states(found)["10.0.0.3:8080"] is PodState.TERMINATING


@pytest.mark.timeout(10)
def test_same_address_in_two_groups_services_stays_in_each_group() -> None:
    config = config_of(
        [
            {"name": "g1", "service": "svc-1", "port": "http"},
            {"name": "g2", "service": "svc-2", "port": "http"},
        ]
    )
    slices = {
        "s1": slice_obj("s1", "svc-1", [endpoint("10.0.0.1")]),
        "s2": slice_obj("s2", "svc-2", [endpoint("10.0.0.2")]),
    }
    found = pods_by_group(config, slices)
    assert states(found["g1"]) == {"10.0.0.1:8080": PodState.READY}
    assert states(found["g2"]) == {"10.0.0.2:8080": PodState.READY}


# ---------------------------------------------------------------------------------------------
# The source against the API-server double


class SourceHarness:
    """A ``KubernetesSource`` on a real asyncio loop in a background thread."""

    def __init__(
        self, api: FakeApiServer, directory: Path, *, coalesce: float = 0.1, timing: WatchTiming = TIMING
    ) -> None:
        kubeconfig = api.kubeconfig(directory / "kubeconfig", namespace=NS)
        self.metrics = Metrics()
        self.holder = TopologyHolder()
        self.snapshots: list[Topology] = []  # every swapped-in topology, in order (on the loop)
        self.holder.subscribe(self.snapshots.append)
        self.source = KubernetesSource(
            CONFIGMAP,
            NS,
            TopologyBuilder(),
            self.holder,
            self.metrics,
            api_factory=lambda: kube_config.new_client_from_config(config_file=str(kubeconfig)),
            timing=timing,
            coalesce=coalesce,
            sync_timeout=3.0,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="source-loop", daemon=True)

    def start(self) -> SourceHarness:
        self._thread.start()
        self.call(self.source.start)
        return self

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the source's loop (its state belongs to that thread) and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.source.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def topology(self) -> Topology | None:
        return self.call(lambda: self.holder.current)

    def config(self) -> ShardConfig | None:
        topology = self.topology()
        return topology.config if topology is not None else None

    def pods(self, group: str) -> dict[str, str]:
        topology = self.topology()
        if topology is None or group not in topology.groups:
            return {}
        return {p.address: str(p.state) for p in topology.groups[group].pods}

    def watches(self) -> dict[str, dict[str, object]]:
        return self.call(lambda: {s.resource: s.describe() for s in self.source.watch_statuses()})


@pytest.fixture
def harness(api: FakeApiServer, tmp_path: Path) -> Iterator[SourceHarness]:
    started = SourceHarness(api, tmp_path).start()
    yield started
    started.stop()


def put_slice(
    api: FakeApiServer, name: str, service: str, endpoints: list[dict[str, Any]], number: int = 8080
) -> None:
    api.put_endpointslice(NS, name, service, endpoints, [port(number, "http")])


GROUPS = [Group("g1", "svc-1"), Group("g2", "svc-2", port=9000)]


@pytest.mark.timeout(30)
def test_source_follows_configmap_and_endpointslices(api: FakeApiServer, harness: SourceHarness) -> None:
    assert harness.topology() is None
    assert wait_for(lambda: harness.source.status.note == "configmap not found: waiting for it")
    put_slice(api, "svc-1-a", "svc-1", [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)])
    put_slice(api, "svc-2-a", "svc-2", [endpoint("10.0.1.1")], number=9000)
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(GROUPS)})
    # The config waits for its Services' first list, so it never starts with empty groups.
    assert wait_for(lambda: harness.topology() is not None)
    topology = harness.topology()
    assert topology is not None
    assert harness.metrics.reloads["applied"] == 1
    assert {p.address for p in topology.groups["g1"].pods} == {"10.0.0.1:8080", "10.0.0.2:8080"}
    assert [p.address for p in topology.groups["g1"].ready] == ["10.0.0.1:8080"]
    assert [p.address for p in topology.groups["g2"].ready] == ["10.0.1.1:9000"]
    recipe = Recipe(GROUPS)
    assert all(topology.ring.owner(f"k{i}") == recipe.owner(f"k{i}") for i in range(200))

    # A second slice of svc-1 adds pods; an endpoint in both slices counts once.
    put_slice(api, "svc-1-b", "svc-1", [endpoint("10.0.0.2"), endpoint("10.0.0.3", terminating=True)])
    assert wait_for(
        lambda: (
            harness.pods("g1")
            == {"10.0.0.1:8080": "ready", "10.0.0.2:8080": "ready", "10.0.0.3:8080": "terminating"}
        )
    ), harness.pods("g1")
    api.delete_endpointslice(NS, "svc-1-b")
    assert wait_for(lambda: harness.pods("g1") == {"10.0.0.1:8080": "ready", "10.0.0.2:8080": "not_ready"}), (
        harness.pods("g1")
    )
    watches = harness.watches()
    assert set(watches) == {f"configmap/{CONFIGMAP}", "endpointslices"}
    assert all(w["up"] for w in watches.values()), watches
    # One list each, then one watch each: no polling of the API server.
    assert api.count(verb="list", resource="configmaps") == 1
    assert api.count(verb="list", resource="endpointslices") == 1


@pytest.mark.timeout(30)
def test_a_burst_of_endpoint_changes_is_coalesced(api: FakeApiServer, harness: SourceHarness) -> None:
    coalesce = 0.1  # the harness's window
    put_slice(api, "svc-1-a", "svc-1", [endpoint("10.9.0.1")])
    put_slice(api, "svc-2-a", "svc-2", [endpoint("10.0.1.1")], number=9000)
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(GROUPS)})
    assert wait_for(lambda: harness.pods("g1") == {"10.9.0.1:8080": "ready"})
    swap_times: list[float] = []  # when each later swap happened, on the source's loop
    harness.call(lambda: harness.holder.subscribe(lambda _topology: swap_times.append(time.monotonic())))
    swaps_before = harness.call(lambda: harness.holder.swaps)
    rebuilds_before = harness.call(lambda: harness.source.rebuilds)

    changes = 100
    started = time.monotonic()
    for i in range(changes):
        # Paced over ~1 s against the clock (a late change goes out at once, never later).
        delay = started + i * (1.0 / changes) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        # Every change is real: a new pair of pods, the second one not ready in odd rounds.
        put_slice(
            api, "svc-1-a", "svc-1", [endpoint(f"10.1.{i}.1"), endpoint(f"10.1.{i}.2", ready=i % 2 == 0)]
        )
    elapsed = time.monotonic() - started
    final = {"10.1.99.1:8080": "ready", "10.1.99.2:8080": "not_ready"}
    assert wait_for(lambda: harness.pods("g1") == final), harness.pods("g1")
    swaps = harness.call(lambda: harness.holder.swaps) - swaps_before
    rebuilds = harness.call(lambda: harness.source.rebuilds) - rebuilds_before
    times = harness.call(lambda: list(swap_times))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(
        f"\ncoalescing: {changes} endpoint changes in {elapsed:.2f}s -> {swaps} topology swaps"
        f" (shortest gap {min(gaps, default=0):.3f}s)"
    )
    assert swaps == rebuilds == len(times) >= 1, (swaps, rebuilds, len(times))
    # The contract: at most one swap per coalescing window, however slow or fast the changes
    # and the machine are; so the swaps are bounded by the windows that passed while they ran
    # (on an idle machine ~11 for these 100 changes).
    assert all(gap >= coalesce - 0.002 for gap in gaps), [round(g, 4) for g in gaps]
    assert swaps <= (times[-1] - times[0]) / coalesce + 1.01, (swaps, times[-1] - times[0])
    assert harness.pods("g2") == {"10.0.1.1:9000": "ready"}


@pytest.mark.timeout(30)
def test_config_change_with_a_new_service_waits_for_its_pods(
    api: FakeApiServer, harness: SourceHarness
) -> None:
    put_slice(api, "svc-1-a", "svc-1", [endpoint("10.0.0.1")])
    put_slice(api, "svc-3-a", "svc-3", [endpoint("10.0.3.1")])
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(GROUPS[:1])})
    assert wait_for(lambda: harness.pods("g1") == {"10.0.0.1:8080": "ready"})
    groups = [*GROUPS[:1], Group("g3", "svc-3")]
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(groups)})
    assert wait_for(lambda: harness.pods("g3") != {}), harness.pods("g3")
    # The first topology with g3 already has g3's pod: a new group never starts empty.
    first_with_g3 = harness.call(lambda: next(t for t in harness.snapshots if "g3" in t.groups))
    assert [p.address for p in first_with_g3.groups["g3"].ready] == ["10.0.3.1:8080"]
    assert harness.pods("g1") == {"10.0.0.1:8080": "ready"}


# ---------------------------------------------------------------------------------------------
# Watch recovery, in process


def _watch_requests(api: FakeApiServer, resource: str) -> list[dict[str, str]]:
    return [r.query for r in api.requests() if r.verb == "watch" and r.resource == resource]


@pytest.mark.timeout(30)
def test_rewatch_after_a_dropped_stream_resumes_where_it_was(
    api: FakeApiServer, harness: SourceHarness
) -> None:
    put_slice(api, "svc-1-a", "svc-1", [endpoint("10.0.0.1")])
    put_slice(api, "svc-2-a", "svc-2", [endpoint("10.0.1.1")], number=9000)
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(GROUPS)})
    assert wait_for(lambda: harness.topology() is not None)
    # Two edits arrive through the watch (not the list).
    for weight in (2, 3):
        groups = [Group("g1", "svc-1", weight=weight), GROUPS[1]]
        text = shard_config(groups)
        api.put_configmap(NS, CONFIGMAP, {"shards.yaml": text})
        expected = parse_shard_config(text)
        assert wait_for(lambda c=expected: harness.config() == c)
    seen_version = int(api.resource_version)
    watches_before = len(_watch_requests(api, "configmaps"))
    swaps_before = harness.call(lambda: len(harness.snapshots))
    assert harness.config() == expected
    applied_before = harness.metrics.reloads["applied"]

    api.drop_watches()
    assert wait_for(lambda: len(_watch_requests(api, "configmaps")) > watches_before)
    # A marker edit after the re-watch: everything the re-watch replays arrives before it.
    final = [Group("g1", "svc-1", weight=4), GROUPS[1]]
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(final)})
    final_config = parse_shard_config(shard_config(final))
    assert wait_for(lambda: harness.config() == final_config)

    # Exactly one new config (the marker) was applied: no old ring came back in between (a
    # rebuild of the config in force, weight 3, is harmless; weight 2 after 3 is not).
    replayed = harness.call(lambda: [t.config.groups[0].weight for t in harness.snapshots[swaps_before:]])
    assert set(replayed) <= {3, 4} and replayed == sorted(replayed) and replayed[-1] == 4, (
        f"weights of g1 swapped in after the reconnect: {replayed}"
    )
    assert harness.metrics.reloads["applied"] == applied_before + 1
    rewatch = _watch_requests(api, "configmaps")[watches_before]
    assert int(rewatch["resourceVersion"]) >= seen_version, rewatch


@pytest.mark.timeout(30)
def test_watch_reports_up_again_after_a_reconnect_without_events(api: FakeApiServer, tmp_path: Path) -> None:
    # Watches that would run for minutes: without an event, only the open watch itself can
    # tell the source that it is connected again (not a re-list when the watch times out).
    long_watches = WatchTiming(
        watch_timeout=300.0, connect_timeout=2.0, list_timeout=5.0, backoff_initial=0.05, backoff_max=0.3
    )
    harness = SourceHarness(api, tmp_path, timing=long_watches).start()
    try:
        put_slice(api, "svc-1-a", "svc-1", [endpoint("10.0.0.1")])
        put_slice(api, "svc-2-a", "svc-2", [endpoint("10.0.1.1")], number=9000)
        api.put_configmap(NS, CONFIGMAP, {"shards.yaml": shard_config(GROUPS)})
        assert wait_for(lambda: harness.topology() is not None)
        assert api.wait_for_watches(2)
        before = {r: len(_watch_requests(api, r)) for r in ("configmaps", "endpointslices")}
        lists = api.count(verb="list")
        api.drop_watches()
        assert wait_for(lambda: all(not w["up"] for w in harness.watches().values()))
        assert wait_for(lambda: all(len(_watch_requests(api, r)) > n for r, n in before.items()))
        assert api.wait_for_watches(2)
        # Connected again (the watches are open on the server): up must say so, with no event
        # and no list since (a watch times out after 4 minutes at the earliest).
        assert wait_for(lambda: all(w["up"] for w in harness.watches().values())), harness.watches()
        assert api.count(verb="list") == lists, "re-listed: the check would not be about the watch"
    finally:
        harness.stop()


# ---------------------------------------------------------------------------------------------
# What one topology swap costs


def big_config(groups: int, weight_of_first: int = 1, vnodes: int = 160) -> ShardConfig:
    return config_of(
        [
            {"name": f"group-{g}", "weight": weight_of_first if g == 0 else 1, "service": f"svc-{g}"}
            for g in range(groups)
        ],
        vnodes=vnodes,
    )


def big_discovery(
    groups: int, pods: int, not_ready: tuple[int, int] | None = None
) -> dict[str, list[DiscoveredPod]]:
    return {
        f"group-{g}": [
            DiscoveredPod(
                f"10.{g}.0.{p + 1}",
                8080,
                PodState.NOT_READY if (g, p) == not_ready else PodState.READY,
                f"pod-{g}-{p}",
            )
            for p in range(pods)
        ]
        for g in range(groups)
    }


def _timed(build: Callable[[], Topology]) -> tuple[float, Topology]:
    started = time.perf_counter()
    topology = build()
    return time.perf_counter() - started, topology


@pytest.mark.timeout(60)
def test_topology_swap_cost_64_groups_x_16_pods() -> None:
    groups, pods = 64, 16
    builder = TopologyBuilder()
    holder = TopologyHolder()
    config = big_config(groups)
    first_cost, first = _timed(lambda: builder.build(config, big_discovery(groups, pods)))
    holder.swap(first)
    assert len(first.ready) == groups * pods

    # Pod-only changes: one pod flips readiness per build; the ring object is reused.
    pod_costs: list[float] = []
    previous = first
    for i in range(30):
        flip = (i % groups, i % pods) if i % 2 == 0 else None
        cost, topology = _timed(lambda f=flip: builder.build(config, big_discovery(groups, pods, f)))
        holder.swap(topology)
        pod_costs.append(cost)
        assert topology.ring is first.ring  # same ShardRing object: not rebuilt, cache kept
        assert len(topology.ready) == groups * pods - (1 if flip else 0)
        # Pod objects (connection pools, in-flight counters) survive the swap.
        assert topology.groups["group-0"].pods[0] is previous.groups["group-0"].pods[0]
        previous = topology

    # Weight changes: the ring is rebuilt every time, and matches the contract's recipe.
    ring_costs: list[float] = []
    rings = [first.ring]  # kept alive, so identity (not a reusable id()) is compared
    for i in range(6):
        weighted = big_config(groups, weight_of_first=2 + i % 2)
        cost, topology = _timed(lambda c=weighted: builder.build(c, big_discovery(groups, pods)))
        holder.swap(topology)
        ring_costs.append(cost)
        assert all(topology.ring is not ring for ring in rings)
        rings.append(topology.ring)
        assert topology.groups["group-0"].weight == 2 + i % 2
    recipe = Recipe({f"group-{g}": (3 if g == 0 else 1) for g in range(groups)})
    keys = [f"user-{n}" for n in range(300)]
    assert [topology.ring.owner(k) for k in keys] == [recipe.owner(k) for k in keys]

    # A group added, and a vnodes change: rebuilt as well.
    grown_cost, grown = _timed(lambda: builder.build(big_config(groups + 1), big_discovery(groups + 1, pods)))
    assert grown.ring is not topology.ring and len(grown.ring.groups) == groups + 1
    vnodes_cost, revnoded = _timed(
        lambda: builder.build(big_config(groups + 1, vnodes=100), big_discovery(groups + 1, pods))
    )
    assert revnoded.ring is not grown.ring
    # The same ring inputs again after a rebuild: reused from then on.
    again = builder.build(big_config(groups + 1, vnodes=100), big_discovery(groups + 1, pods, (0, 0)))
    assert again.ring is revnoded.ring

    ms = 1000.0
    print(
        f"\nswap cost, {groups} groups x {pods} pods ({groups * pods} pods, ring {first.ring.points} points):"
        f"\n  first build (ring built)       {first_cost * ms:8.2f} ms"
        f"\n  pod-only change (ring reused)  median {statistics.median(pod_costs) * ms:8.2f} ms,"
        f" max {max(pod_costs) * ms:8.2f} ms (n={len(pod_costs)})"
        f"\n  weight change (ring rebuilt)   median {statistics.median(ring_costs) * ms:8.2f} ms,"
        f" max {max(ring_costs) * ms:8.2f} ms (n={len(ring_costs)})"
        f"\n  group added (ring rebuilt)     {grown_cost * ms:8.2f} ms"
        f"\n  vnodes change (ring rebuilt)   {vnodes_cost * ms:8.2f} ms"
    )
    assert holder.swaps == 1 + 30 + 6
