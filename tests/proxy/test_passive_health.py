"""Passive health (outlier ejection, gateway.proxy.health): a pod that refuses connections, or
answers a run of 5xx, gets no new request until its ejection ends, then one trial; never the
group's last pod for 5xx; a group with no usable pod answers writes 503 shard_unavailable at
once; nothing leaves its owner group (docs/contract.md "Health").

In process: the client protocol on a fake transport, in front of real upstream servers on
127.0.0.1 (and ports nobody listens on).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from gateway.config import parse_shard_config
from gateway.topology import Pod, TopologyBuilder
from tests.proxy.harness import KEY_HEADER, Harness, RecordedHead, RecordingUpstream, harness, responses_in
from tests.proxy.test_fenced_writes import post
from tests.support import free_port


@dataclass
class Answering(RecordingUpstream):
    """A pod that answers every request with ``status``."""

    status: int = 200
    fence: bool = False  # the answer is the fence's own (X-Shard-Fence), not the application's

    def answer(self, head: RecordedHead) -> bytes:
        fence = b"X-Shard-Fence: shard_state_unconfirmed\r\n" if self.fence else b""
        return b"HTTP/1.1 %d X\r\n%sContent-Length: 2\r\n\r\nok" % (self.status, fence)


def build(plane: Harness, addresses: list[str], health: str = "") -> None:
    """One group, ``g``, of the pods at ``addresses``."""
    text = (
        "version: 1\n"
        f"routing: {{key_header: {KEY_HEADER}}}\n"
        f"{health}"
        f"groups:\n  - name: g\n    endpoints: {json.dumps(addresses)}\n"
    )
    plane.holder.swap(TopologyBuilder().build(parse_shard_config(text)))


def pods(plane: Harness) -> dict[str, Pod]:
    topology = plane.holder.current
    assert topology is not None
    return {p.address: p for p in topology.groups["g"].pods}


def write(plane: Harness, key: str = "alice") -> tuple[int, dict[bytes, bytes], bytes]:
    """One write on a fresh client connection; its one response."""
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}", key)])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    ((response),) = responses_in(bytes(transport.written))
    return response


def write_until(plane: Harness, done: Callable[[], bool], limit: int = 200) -> None:
    """Writes, one after the other (keys vary), until ``done``."""
    for n in range(limit):
        if done():
            return
        write(plane, f"user-{n}")
    raise AssertionError(f"not done after {limit} writes")


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


@pytest.fixture
def plane() -> Iterator[Harness]:
    with harness() as plane:
        yield plane


def serving(plane: Harness, *upstreams: Answering) -> list[str]:
    for upstream in upstreams:
        plane.run(upstream.start())
    return [f"127.0.0.1:{u.port}" for u in upstreams]


def test_a_pod_refusing_connections_is_ejected_and_gets_no_new_request(plane: Harness) -> None:
    (live,) = serving(plane, live_pod := Answering())
    dead = dead_address()
    build(plane, [dead, live])
    statuses = [write(plane, f"user-{n}")[0] for n in range(30)]
    assert statuses == [200] * 30  # the refused connection was retried on the other pod
    assert plane.metrics.upstream_connect_failures == 1  # and never tried again
    assert plane.metrics.ejections == {"g connect_failure": 1}
    assert pods(plane)[dead].ejected and len(live_pod.heads) == 30
    health = plane.ctx.health.describe(pods(plane)[dead])
    assert health["health"] == "ejected" and 27 <= float(str(health["ejected_for"])) <= 33


def test_a_group_whose_pods_all_refuse_answers_writes_503_shard_unavailable_at_once(
    plane: Harness,
) -> None:
    build(plane, [dead_address(), dead_address()])
    first = write(plane)
    assert first[0] == 502 and json.loads(first[2])["error"] == "upstream_error"  # both tried
    assert plane.metrics.upstream_connect_failures == 2
    for n in range(5):
        status, headers, body = write(plane, f"user-{n}")
        assert (status, json.loads(body)["error"], headers[b"retry-after"]) == (
            503,
            "shard_unavailable",
            b"1",
        )
        assert headers[b"x-shard-group"] == b"g"
    assert plane.metrics.upstream_connect_failures == 2  # no connect attempt for those


def test_a_run_of_5xx_ejects_a_pod_and_the_rest_of_the_group_serves(plane: Harness) -> None:
    failing, healthy = Answering(status=500), Answering()
    addresses = serving(plane, failing, healthy)
    build(plane, addresses)
    write_until(plane, lambda: len(failing.heads) == 5)
    assert failing.status == 500 and plane.metrics.ejections == {"g consecutive_5xx": 1}  # its 5th
    after = [write(plane, f"after-{n}")[0] for n in range(20)]
    assert after == [200] * 20 and len(failing.heads) == 5


def test_5xx_never_eject_the_last_usable_pod_of_a_group(plane: Harness) -> None:
    (address,) = serving(plane, only := Answering(status=500))
    build(plane, [address])
    assert [write(plane, f"user-{n}")[0] for n in range(12)] == [500] * 12  # the application's
    assert len(only.heads) == 12 and plane.metrics.ejections == {}


def test_an_ejection_ends_with_one_trial_request_that_trusts_the_pod_again(plane: Harness) -> None:
    failing, healthy = Answering(status=500), Answering()
    addresses = serving(plane, failing, healthy)
    build(plane, addresses, "health: {passive: {consecutive_5xx: 1, base_ejection: 1}}\n")
    pod = pods(plane)[addresses[0]]
    write_until(plane, lambda: len(failing.heads) == 1)  # its first 500: ejected at once
    assert pod.ejected and not pod.trial
    assert 0.4 < float(str(plane.ctx.health.describe(pod)["ejected_for"])) <= 1.1
    plane.wait_for(lambda: pod.trial)  # the ejection is over: the next request is the trial
    assert not pod.ejected and len(failing.heads) == 1
    failing.status = 200  # it recovered
    write_until(plane, lambda: len(failing.heads) == 2)  # the trial
    assert not pod.trial and not pod.ejected  # the trial's answer trusted it again
    assert plane.ctx.health.describe(pod)["health"] == "healthy"


def test_a_failed_trial_ejects_the_pod_for_longer(plane: Harness) -> None:
    failing, healthy = Answering(status=500), Answering()
    addresses = serving(plane, failing, healthy)
    build(plane, addresses, "health: {passive: {consecutive_5xx: 1, base_ejection: 0.5}}\n")
    pod = pods(plane)[addresses[0]]
    write_until(plane, lambda: len(failing.heads) == 1)
    plane.wait_for(lambda: pod.trial)
    write_until(plane, lambda: len(failing.heads) == 2)  # the trial: a 500 again
    health = plane.ctx.health.describe(pod)
    assert (health["health"], health["ejections"]) == ("ejected", 2)
    # Twice the base time (plus up to 10%), less the moments since: longer than the first.
    assert 0.55 < float(str(health["ejected_for"])) <= 1.1
    assert plane.metrics.ejections == {"g consecutive_5xx": 2}


def test_a_trial_pod_gets_one_request_at_a_time(plane: Harness) -> None:
    (address,) = serving(plane, upstream := Answering())
    build(plane, [address])
    pod = pods(plane)[address]
    pod.trial = True  # (as an ejection's end leaves it)
    held_client, held = plane.connect()
    held_write = f"POST /hold HTTP/1.1\r\nHost: t\r\n{KEY_HEADER}: a\r\nContent-Length: 0\r\n\r\n"
    plane.feed(held_client, [held_write.encode()])
    plane.wait_for(lambda: len(upstream.heads) == 1)  # the trial request, unanswered
    status, _, body = write(plane, "bob")
    assert (status, json.loads(body)["error"]) == (503, "shard_unavailable")  # nobody else goes
    upstream.release.set()
    plane.wait_for(lambda: len(responses_in(bytes(held.written))) == 1)
    assert not pod.trial and not pod.ejected
    assert write(plane, "carol")[0] == 200


def test_a_fences_own_503s_are_no_failure_of_the_pod(plane: Harness) -> None:
    fenced, other = Answering(status=503, fence=True), Answering()
    addresses = serving(plane, fenced, other)
    build(plane, addresses)
    statuses = [write(plane, f"user-{n}")[0] for n in range(40)]
    assert statuses.count(503) == len(fenced.heads) >= 6  # passed on, pod kept (a 5xx run is 5)
    assert plane.metrics.ejections == {} and not pods(plane)[addresses[0]].ejected


def test_the_requests_on_their_way_to_a_pod_that_fail_with_it_are_one_ejection(plane: Harness) -> None:
    (live,) = serving(plane, Answering())
    dead = dead_address()
    build(plane, [dead, live])
    transports = []
    for n in range(16):  # all at once: about half of them pick the dead pod before it is ejected
        client, transport = plane.connect()
        client.data_received(post(b"{}", f"user-{n}"))
        transports.append(transport)
    plane.wait_for(lambda: all(len(responses_in(bytes(t.written))) == 1 for t in transports))
    assert [responses_in(bytes(t.written))[0][0] for t in transports] == [200] * 16
    assert plane.metrics.upstream_connect_failures >= 2  # (several found it refusing)
    assert plane.metrics.ejections == {"g connect_failure": 1}
    assert plane.ctx.health.describe(pods(plane)[dead])["ejections"] == 1


def test_a_retry_never_goes_to_the_pod_its_failure_ejected(plane: Harness) -> None:
    build(plane, [dead_address()])  # a one-pod group
    status, _, body = write(plane)
    assert (status, json.loads(body)["error"]) == (502, "upstream_error")  # the failure itself
    assert plane.metrics.upstream_connect_failures == 1  # no second attempt at the ejected pod


def test_failed_trials_eject_for_longer_each_time(plane: Harness) -> None:
    failing, healthy = Answering(status=500), Answering()
    addresses = serving(plane, failing, healthy)
    build(plane, addresses, "health: {passive: {consecutive_5xx: 1, base_ejection: 0.3, max_ejection: 2}}\n")
    pod = pods(plane)[addresses[0]]
    durations = []
    for trial in range(1, 4):
        write_until(plane, lambda trial=trial: len(failing.heads) == trial)  # (the trial, after the first)
        durations.append(float(str(plane.ctx.health.describe(pod)["ejected_for"])))
        plane.wait_for(lambda: pod.trial)
    assert durations[0] < durations[1] < durations[2]  # 0.3, 0.6, 0.9 s (+ up to 10%)
    assert plane.ctx.health.describe(pod)["ejections"] == 3


def test_a_pod_on_trial_does_not_count_as_trusted_when_another_answers_5xx(plane: Harness) -> None:
    """A was ejected for its 500s; B, then the group's last trusted pod, answers 500s too: B is
    kept (the application's answer) while A is only on trial (its trial may fail)."""
    first, second = Answering(status=500), Answering(status=500)
    addresses = serving(plane, first, second)
    build(plane, addresses, "health: {passive: {consecutive_5xx: 1, base_ejection: 0.2}}\n")
    both = list(pods(plane).values())
    write_until(plane, lambda: any(p.ejected for p in both))
    (ejected,) = [p for p in both if p.ejected]
    (kept,) = [p for p in both if not p.ejected]
    plane.wait_for(lambda: ejected.trial)  # its ejection is over; its trial request not yet sent
    plane.ctx.health.answered(kept, True, False)  # the kept pod's next 500 (not a trial)
    assert not kept.ejected, "the group's last trusted pod was ejected for its 500s"


def test_turning_passive_health_off_trusts_the_ejected_pods_again(plane: Harness) -> None:
    (live,) = serving(plane, Answering())
    dead = dead_address()
    build(plane, [dead, live])
    write_until(plane, lambda: pods(plane)[dead].ejected)
    build(plane, [dead, live], "health: {passive: {enabled: false}}\n")
    assert not pods(plane)[dead].ejected and not pods(plane)[dead].trial


def test_4xx_and_429_answers_are_no_failure(plane: Harness) -> None:
    limited, other = Answering(status=429), Answering()
    addresses = serving(plane, limited, other)
    build(plane, addresses)
    statuses = [write(plane, f"user-{n}")[0] for n in range(30)]
    assert statuses.count(429) == len(limited.heads) >= 6 and plane.metrics.ejections == {}


def test_after_a_long_trusted_spell_an_incident_starts_from_the_base_time_and_grows_again(
    plane: Harness,
) -> None:
    failing, healthy = Answering(status=500), Answering()
    addresses = serving(plane, failing, healthy)
    build(
        plane, addresses, "health: {passive: {consecutive_5xx: 1, base_ejection: 0.1, max_ejection: 0.3}}\n"
    )
    pod = pods(plane)[addresses[0]]
    health = plane.ctx.health
    write_until(plane, lambda: len(failing.heads) == 1)
    plane.wait_for(lambda: pod.trial)
    failing.status = 200
    write_until(plane, lambda: len(failing.heads) == 2)  # its trial: trusted again
    trusted_at = plane.loop.time()
    plane.wait_for(lambda: plane.loop.time() > trusted_at + 0.35)  # trusted past max_ejection
    failing.status = 500
    write_until(plane, lambda: len(failing.heads) == 3)
    assert health.describe(pod)["ejections"] == 1  # a new incident: from the base time
    plane.wait_for(lambda: pod.trial)
    write_until(plane, lambda: len(failing.heads) == 4)  # its trial fails
    assert health.describe(pod)["ejections"] == 2  # and the next ejection is longer again
