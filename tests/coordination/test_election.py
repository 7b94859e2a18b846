"""Leader election on the Lease ``NAME-leader`` (client-go's semantics) through the real client:
one of two candidates leads; a release hands over at once; a leader cut off from the API
server stops leading within the renew deadline, and the other takes over only once the record
stayed unchanged for a lease duration on its own clock."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from gateway.coordination import LeaderElection
from tests.coordination.conftest import CONFIGMAP, DEADLINE, NS, Kube, eventually, run
from tests.k8s.apiserver import FakeApiServer

LEASE = 2.0
RENEW_DEADLINE = 1.2
RETRY = 0.2
MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def candidate(kube: Kube, identity: str, lease: float = LEASE) -> LeaderElection:
    return LeaderElection(
        kube.factory(identity),
        NS,
        CONFIGMAP,
        identity,
        lease_duration=lease,
        renew_deadline=RENEW_DEADLINE,
        retry_period=RETRY,
        request_timeout=1.0,
    )


def lease_spec(api: FakeApiServer) -> dict[str, Any]:
    obj = api.get_object("leases", NS, f"{CONFIGMAP}-leader")
    assert obj is not None
    spec: dict[str, Any] = obj["spec"]
    return spec


@dataclass(frozen=True)
class Sample:
    at: float
    a: bool
    b: bool


class Sampler:
    """Who leads, sampled on every poll: never both, at any sample."""

    def __init__(self, a: LeaderElection, b: LeaderElection) -> None:
        self.a, self.b = a, b
        self.samples: list[Sample] = []

    def take(self) -> Sample:
        sample = Sample(time.monotonic(), self.a.leading, self.b.leading)
        self.samples.append(sample)
        assert not (sample.a and sample.b), "two candidates lead at once"
        return sample


def test_exactly_one_of_two_candidates_leads_and_a_release_hands_over(api: FakeApiServer, kube: Kube) -> None:
    # A lease far longer than the test's deadline: a hand-over within it is the release's doing.
    a, b = candidate(kube, "replica-a", lease=3600), candidate(kube, "replica-b", lease=3600)
    changes: list[str] = []

    async def scenario() -> None:
        sampler = Sampler(a, b)
        await a.start(lambda: changes.append("a"))
        await b.start(lambda: changes.append("b"))
        try:
            assert await eventually(lambda: (s := sampler.take()).a or s.b)
            leader, other = (a, b) if a.leading else (b, a)
            spec = lease_spec(api)
            assert spec["holderIdentity"] == leader.identity
            assert spec["leaseDurationSeconds"] == 3600 and spec["leaseTransitions"] == 0
            assert MICRO_TIME.match(spec["acquireTime"]) and MICRO_TIME.match(spec["renewTime"])

            # The leader keeps renewing (renewTime moves, acquireTime stays) and stays alone.
            renewals = {spec["renewTime"]}

            def renewed_three_times() -> bool:
                sampler.take()
                now = lease_spec(api)
                assert now["holderIdentity"] == leader.identity and now["acquireTime"] == spec["acquireTime"]
                renewals.add(now["renewTime"])
                return len(renewals) >= 4

            assert await eventually(renewed_three_times)
            assert leader.leading and not other.leading

            await leader.stop()
            released = lease_spec(api)
            assert released.get("holderIdentity") is None and released["leaseTransitions"] == 0
            # Released, so not waited out (the record would stand for an hour otherwise).
            assert await eventually(lambda: sampler.take().b if other is b else sampler.take().a)
            spec = lease_spec(api)
            assert spec["holderIdentity"] == other.identity and spec["leaseTransitions"] == 1
        finally:
            await a.stop()
            await b.stop()

    run(scenario)
    assert changes.count("a") + changes.count("b") >= 3  # won, lost (released), won


def test_a_leader_cut_off_stops_within_the_renew_deadline_and_the_other_waits_out_the_lease(
    api: FakeApiServer, kube: Kube
) -> None:
    a, b = candidate(kube, "replica-a"), candidate(kube, "replica-b")

    async def scenario() -> None:
        sampler = Sampler(a, b)
        await a.start(lambda: None)
        await b.start(lambda: None)
        try:
            assert await eventually(lambda: (s := sampler.take()).a or s.b)
            leader, other = (a, b) if a.leading else (b, a)
            last_renew = lease_spec(api)["renewTime"]
            assert await eventually(lambda: lease_spec(api)["renewTime"] != last_renew)  # renewing

            api.cut_off(leader.identity)
            cut_at = time.monotonic()
            assert await eventually(lambda: (sampler.take(), other.leading)[1], timeout=DEADLINE + LEASE)
            renewed_at = leader.renewed_at
            assert renewed_at is not None and renewed_at <= cut_at  # no renewal got through the cut

            # Leading only while the last renewal was sent less than the renew deadline ago.
            for sample in sampler.samples:
                is_leading = sample.a if leader is a else sample.b
                if sample.at >= renewed_at + RENEW_DEADLINE:
                    assert not is_leading, (sample, renewed_at)
            assert not leader.leading and leader.lost_at is not None

            # The other took over only once the record stood still for a lease duration on its
            # clock; the record it waited on was written after renewed_at (when it was sent).
            assert other.acquired_at is not None
            assert other.acquired_at >= renewed_at + LEASE, (other.acquired_at - renewed_at, LEASE)
            spec = lease_spec(api)
            assert spec["holderIdentity"] == other.identity and spec["leaseTransitions"] == 1

            # Healed, the old leader finds the Lease held by another and stays a candidate.
            api.cut_off(leader.identity, False)
            renewed = lease_spec(api)["renewTime"]
            assert await eventually(lambda: lease_spec(api)["renewTime"] != renewed)
            assert await eventually(lambda: leader.describe()["holder"] == other.identity)
            assert not leader.leading and other.leading
        finally:
            await a.stop()
            await b.stop()

    run(scenario)
