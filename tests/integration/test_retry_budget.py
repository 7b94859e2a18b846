"""The retry budget with real processes (docs/contract.md "Retries"): while a group answers
503, reads are tried again on its other pods only within the budget, so the pods see at most
1.2 times the client's requests; a write is never sent twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import KEY_HEADER, GatewayFactory, group_of, http_request
from tests.integration.test_proxy_health import FailingPod

pytestmark = pytest.mark.timeout(120)

CLIENTS, PER_CLIENT = 32, 25


def test_while_a_group_answers_503_the_pods_see_at_most_1_2x_the_requests(
    start_gateway: GatewayFactory,
) -> None:
    pods = [FailingPod(503) for _ in range(3)]
    try:
        addresses = [f"127.0.0.1:{pod.server.start()}" for pod in pods]
        # Passive health off: every pod stays usable, so every failed read could be retried.
        gw = start_gateway([group_of("g", addresses)], health={"passive": {"enabled": False}})

        def client(index: int) -> list[int]:
            return [
                http_request(gw.port, "GET", f"/r/{index}/{n}", {KEY_HEADER: f"user-{index}"}).status
                for n in range(PER_CLIENT)
            ]

        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for result in pool.map(client, range(CLIENTS)) for s in result]
        requests = CLIENTS * PER_CLIENT
        attempts = sum(pod.answered for pod in pods)
        retries = gw.metric("shardgate_upstream_retries_total")
        assert statuses == [503] * requests  # the pods' own answer: retries cannot fix a whole group
        assert attempts == requests + retries
        assert requests < attempts <= 1.2 * requests, (attempts, requests)
        assert gw.metric("shardgate_retry_budget_exhausted_total") == requests - retries
        write = http_request(gw.port, "POST", "/w", {KEY_HEADER: "alice"}, b"{}")
        assert write.status == 503 and sum(pod.answered for pod in pods) == attempts + 1
    finally:
        for pod in pods:
            pod.server.stop()
