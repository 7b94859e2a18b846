"""Reads tried again after a pod failed them (gateway.proxy.retries, docs/contract.md "Retries"):
a bodiless idempotent read a pod answered 502/503/504, or reset under, goes once more to another
pod after a backoff, within the retry budget; a write never does; a full budget leaves the
pod's answer as the answer.

In process: the client protocol on a fake transport, in front of real upstream servers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.config import parse_shard_config
from gateway.proxy.retries import MINIMUM, RATIO, RetryBudget
from gateway.topology import TopologyBuilder
from tests.proxy.harness import KEY_HEADER, Harness, RecordedHead, RecordingUpstream, harness
from tests.proxy.test_fenced_writes import post
from tests.proxy.test_rate_limits import send


@dataclass
class Answering(RecordingUpstream):
    status: int = 200

    def answer(self, head: RecordedHead) -> bytes:
        return b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nno" % self.status


def group_of(plane: Harness, pods: tuple[RecordingUpstream, ...]) -> None:
    """One group of ``pods`` (started here), passive health off: what is asserted is the
    retry, not the ejection."""
    for pod in pods:
        plane.run(pod.start())
    endpoints = [f"127.0.0.1:{pod.port}" for pod in pods]
    text = (
        f"version: 1\nrouting: {{key_header: {KEY_HEADER}}}\nhealth: {{passive: {{enabled: false}}}}\n"
        f"groups:\n  - name: g\n    endpoints: {json.dumps(endpoints)}\n"
    )
    plane.holder.swap(TopologyBuilder().build(parse_shard_config(text)))


def two_pods(plane: Harness, failing_status: int) -> tuple[Answering, Answering]:
    """A pod answering ``failing_status`` and a healthy one, in one group."""
    failing, healthy = Answering(status=failing_status), Answering(status=200)
    group_of(plane, (failing, healthy))
    return failing, healthy


GET = b"GET /r HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def plane() -> Iterator[Harness]:
    with harness() as plane:
        yield plane


def earn(plane: Harness, retries: float) -> None:
    plane.ctx.retries.earned = retries  # as if earlier requests had earned them


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_read_a_pod_answered_5xx_is_answered_by_another_pod(plane: Harness, status: int) -> None:
    failing, healthy = two_pods(plane, status)
    answers = []
    while not failing.heads:  # (the pod is picked at random: until one read went there)
        earn(plane, MINIMUM)
        answers.append(send(plane, GET)[0])
    assert answers == [200] * len(answers)
    assert len(healthy.heads) == len(answers)  # the failed one was answered by the other pod
    assert plane.metrics.upstream_retries == 1
    assert plane.ctx.retries.retrying == 0 and plane.ctx.retries.in_flight == 0


def test_a_write_a_pod_answered_503_is_never_sent_again(plane: Harness) -> None:
    failing, healthy = two_pods(plane, 503)
    statuses = []
    while not failing.heads:
        earn(plane, MINIMUM)
        statuses.append(send(plane, post(b"{}", f"user-{len(statuses)}"))[0])
    assert statuses[-1] == 503  # the pod's own answer, passed on
    assert len(failing.heads) + len(healthy.heads) == len(statuses)
    assert plane.metrics.upstream_retries == 0


def test_a_read_with_no_retry_earned_gets_the_pod_s_answer(plane: Harness) -> None:
    failing, _ = two_pods(plane, 503)
    statuses = []
    while not failing.heads:
        earn(plane, 0.0)
        statuses.append(send(plane, GET)[0])
    assert statuses[-1] == 503
    assert plane.metrics.retry_budget_exhausted == 1 and plane.metrics.upstream_retries == 0


def test_the_budget_at_a_time_and_over_time() -> None:
    budget = RetryBudget(jitter=lambda: 1.0)
    for _ in range(100):
        budget.bound(first_attempt=True)
    assert budget.earned == MINIMUM  # saved from calm times: at most MINIMUM
    assert [budget.try_take() for _ in range(4)] == [True, True, True, False]
    budget.earned = 50.0
    assert budget.try_take()  # 100 in flight: 20 at a time
    budget.retrying = 20
    assert not budget.try_take()
    budget.give_back()
    assert budget.try_take()
    # Over time: N requests earn RATIO x N retries, no more.
    fresh = RetryBudget()
    taken = 0
    for _ in range(1000):
        fresh.bound(first_attempt=True)
        fresh.in_flight -= 1
        while fresh.try_take():
            taken += 1
            fresh.give_back()
    assert taken == int(1000 * RATIO)
    assert budget.backoff() == pytest.approx(0.025)


def test_a_reset_under_a_read_is_retried_on_another_pod(plane: Harness) -> None:
    @dataclass
    class Resetting(RecordingUpstream):
        def answer(self, head: RecordedHead) -> bytes:
            raise ConnectionResetError  # closes the connection without a byte of answer

    resetting, healthy = Resetting(), Answering(status=200)
    group_of(plane, (resetting, healthy))
    answers = []
    while not resetting.heads:
        earn(plane, MINIMUM)
        answers.append(send(plane, GET)[0])
    assert answers == [200] * len(answers)
    assert plane.metrics.upstream_retries == 1
