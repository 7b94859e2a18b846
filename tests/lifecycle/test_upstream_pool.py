"""The per-pod pool of idle upstream connections: ``SHARDGATE_MAX_IDLE_PER_POD``.

After a burst of concurrent requests to one pod the gateway holds as many upstream connections
as the burst needed; once they are answered, at most ``MAX_IDLE_PER_POD`` of them stay open
(pooled, and reused by the next requests), the others are closed. Observed from the upstream's
side (its open connections) and from the gateway's (``shardgate_pod_upstream_connections``).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Gateway, group_of
from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.lifecycle.conftest import Background, RawUpstream, UpstreamSet, one_request, wait_for

MAX_IDLE = 2
BURST = 8


def pool_metric(gw: Gateway, pod: RawUpstream, state: str) -> float:
    return gw.metric("shardgate_pod_upstream_connections", group=pod.group, pod=pod.address, state=state)


@pytest.mark.timeout(60)
def test_after_a_burst_at_most_max_idle_connections_stay_open_to_a_pod(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("g-a", "a-1")  # never closes a connection on its own
    gw = static_gateways(
        [group_of("g-a", [pod.address])],
        # A long idle timeout: pooled connections are closed by the pool limit, not by age.
        env={"SHARDGATE_MAX_IDLE_PER_POD": str(MAX_IDLE), "SHARDGATE_UPSTREAM_IDLE_TIMEOUT": "600"},
    )

    # BURST requests in flight at once, each on its own upstream connection.
    burst = [
        Background(
            lambda i=i: one_request(gw.port, "GET", f"/hold?gate=burst&i={i}", f"k{i}"), name=f"burst-{i}"
        )
        for i in range(BURST)
    ]
    try:
        assert wait_for(lambda: len(pod.hits(lambda h: h.path == "/hold")) == BURST), pod.hits()
        assert pod.open_connections() == BURST
        assert wait_for(lambda: pool_metric(gw, pod, "busy") == BURST), pool_metric(gw, pod, "busy")
    finally:
        pod.release("burst")
    for request in burst:
        assert request.result().status == 200
    assert pod.connections_opened == BURST

    # Answered: MAX_IDLE connections are pooled, the rest closed.
    assert wait_for(lambda: pod.open_connections() == MAX_IDLE), pod.open_connections()
    assert wait_for(lambda: pool_metric(gw, pod, "idle") == MAX_IDLE), pool_metric(gw, pod, "idle")
    assert pool_metric(gw, pod, "busy") == 0

    # The pooled ones are used again: sequential requests open no new connection.
    for i in range(5):
        assert one_request(gw.port, "GET", f"/after/{i}", "after").status == 200
    assert pod.connections_opened == BURST
    assert {h.conn for h in pod.hits(lambda h: h.path.startswith("/after/"))} <= {
        h.conn for h in pod.hits(lambda h: h.path == "/hold")
    }
    assert pod.open_connections() == MAX_IDLE
    assert pool_metric(gw, pod, "idle") == MAX_IDLE
