"""The barrier's participants as the leader reaches them: the replica Leases (through the real
client, against the API-server double) and the backend pods' fences (real fences, over HTTP)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from gateway.coordination import UNFENCED, PodProber, ReplicaRegistry
from gateway.coordination.kube import micro_time
from gateway.coordination.prober import FENCE_PATH
from gateway.fence import STATE_PATH, Fence
from gateway.handoff import Report
from gateway.shardstate import Phase, ShardState
from tests.coordination.conftest import (
    CONFIGMAP,
    NS,
    Kube,
    black_hole,
    config_text,
    eventually,
    run,
    serve_backend,
    silent_address,
)
from tests.k8s.apiserver import FakeApiServer


def registry(kube: Kube, identity: str, renew_interval: float = 0.3) -> ReplicaRegistry:
    return ReplicaRegistry(
        kube.factory(identity), NS, CONFIGMAP, identity, lease_duration=2, renew_interval=renew_interval
    )


def replica_lease(api: FakeApiServer, identity: str) -> dict[str, object] | None:
    return api.get_object("leases", NS, f"{CONFIGMAP}-replica-{identity}")


def test_replicas_report_in_their_leases_and_the_leader_lists_them(api: FakeApiServer, kube: Kube) -> None:
    # Renewals every minute: a report that shows within the test's deadline was written at once.
    a, b = registry(kube, "gw-a", renew_interval=60), registry(kube, "gw-b", renew_interval=60)
    lived = time.time() - 5 * 2  # renewed five lease durations ago: late, but not gone
    api.put_lease(
        NS,
        f"{CONFIGMAP}-replica-gw-late",
        {"holderIdentity": "gw-late", "leaseDurationSeconds": 2, "renewTime": micro_time(lived)},
        labels={"shardgate.io/replica-of": CONFIGMAP},
    )
    crashed = time.time() - 11 * 2  # more than ten lease durations: a replica long gone
    api.put_lease(
        NS,
        f"{CONFIGMAP}-replica-gw-gone",
        {"holderIdentity": "gw-gone", "leaseDurationSeconds": 2, "renewTime": micro_time(crashed)},
        labels={"shardgate.io/replica-of": CONFIGMAP},
    )
    api.put_lease(  # another fleet's replica: not ours
        NS,
        "other-replica-gw-x",
        {"holderIdentity": "gw-x", "leaseDurationSeconds": 2, "renewTime": micro_time(time.time())},
        labels={"shardgate.io/replica-of": "other"},
    )

    async def scenario() -> None:
        await a.start()
        await b.start()
        try:
            assert await eventually(lambda: replica_lease(api, "gw-a") is not None and a.renewals >= 1)
            a.report(7, 2)
            assert await eventually(
                lambda: (
                    ((replica_lease(api, "gw-a") or {}).get("metadata") or {}).get("annotations")  # type: ignore[attr-defined]
                    == {"shardgate.io/generation": "7", "shardgate.io/moving-in-flight": "2"}
                )
            )
            lease = replica_lease(api, "gw-a")
            assert lease is not None
            assert lease["metadata"]["labels"]["shardgate.io/replica-of"] == CONFIGMAP  # type: ignore[index]
            assert lease["spec"]["holderIdentity"] == "gw-a"  # type: ignore[index]

            assert await eventually(lambda: replica_lease(api, "gw-b") is not None)
            found = await b.replicas()
            assert found == {"gw-a": Report(7, 2), "gw-b": Report(None, 0), "gw-late": Report(None, 0)}
            assert replica_lease(api, "gw-gone") is None  # deleted, as well as skipped
            assert replica_lease(api, "gw-late") is not None
        finally:
            await a.stop()
            await b.stop()

    run(scenario)
    assert replica_lease(api, "gw-a") is None and replica_lease(api, "gw-b") is None  # deleted on stop


def test_a_replica_lease_renewed_meanwhile_is_not_deleted_as_stale(api: FakeApiServer, kube: Kube) -> None:
    """The stale Lease is deleted only at the version the leader listed (a precondition)."""
    leader = registry(kube, "gw-a")
    name = f"{CONFIGMAP}-replica-gw-slow"
    old = api.put_lease(
        NS,
        name,
        {"holderIdentity": "gw-slow", "leaseDurationSeconds": 2, "renewTime": micro_time(time.time() - 60)},
        labels={"shardgate.io/replica-of": CONFIGMAP},
    )

    async def scenario() -> None:
        # The replica renews between the leader's list and its delete: the delete must not land.
        api.put_lease(
            NS,
            name,
            {"holderIdentity": "gw-slow", "leaseDurationSeconds": 2, "renewTime": micro_time(time.time())},
            labels={"shardgate.io/replica-of": CONFIGMAP},
        )
        await leader._forget(name, old["metadata"]["resourceVersion"], 60.0)

    run(scenario)
    assert replica_lease(api, "gw-slow") is not None


def fence_state(generation: int) -> str:
    config = config_text()
    return ShardState(generation=generation, phase=Phase.STABLE, config=config, since=time.time()).to_json()


def test_the_prober_reads_fences_and_tells_unfenced_pods_from_silent_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert FENCE_PATH == STATE_PATH
    config_path = tmp_path / "shards.yaml"
    state_path = tmp_path / "shards.yaml.state"
    state_path.write_text(fence_state(1))
    # The fence polls its file once an hour: only the probe's ?generation= makes it read again.
    fence = Fence.from_file(str(config_path), group="g1", poll_interval=3600, pod="g1-0")
    prober = PodProber(timeout=1.0)

    async def scenario() -> None:
        await prober.start()
        async with (
            serve_backend("g1", fence) as fenced,
            serve_backend("g1", status=404, document={"error": "not found"}) as not_found,
            serve_backend("g1", document={"status": "ok"}) as other_json,
            serve_backend("g1", status=503, document={"error": "overloaded"}) as failing,
        ):
            try:
                assert await eventually(lambda: fence.view is not None)
                assert await prober.probe(fenced.address, 1) == Report(1, 0)
                state_path.write_text(fence_state(2))
                assert await prober.probe(fenced.address, 2) == Report(2, 0)  # re-read at once
                assert fenced.probes == ["1", "2"]

                assert await prober.probe(not_found.address, 2) is UNFENCED
                assert await prober.probe(not_found.address, 2) is UNFENCED
                assert await prober.probe(other_json.address, 2) is UNFENCED
                assert await prober.probe(failing.address, 2) is None  # an error is no answer
                assert await prober.probe(silent_address(), 2) is None  # refused
                with black_hole() as address:
                    assert await prober.probe(address, 2) is None  # timed out
            finally:
                await prober.stop()

    with caplog.at_level(logging.WARNING, logger="shardgate.coordinator"):
        run(scenario)
    warned = [r.getMessage() for r in caplog.records if "answers no fence" in r.getMessage()]
    assert len(warned) == 2, warned  # once per pod, not per probe
