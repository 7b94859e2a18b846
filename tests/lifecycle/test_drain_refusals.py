"""After the drain delay the gateway begins nothing new: a request it has not yet begun to
forward is answered ``503 not_ready`` (``Connection: close``, ``Retry-After``), never forwarded
and never dropped without an answer (the contract's "not_ready" row, docs/contract.md)."""

from __future__ import annotations

import json
import signal

import pytest

from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.integration.conftest import group_of
from tests.integration.upstream import RawConn, RawResponse, build_request
from tests.lifecycle.conftest import UpstreamSet, connect_refused, readyz, wait_for

DRAIN = {"SHARDGATE_DRAIN_DELAY": "1", "SHARDGATE_GRACE_TIMEOUT": "10"}


def _assert_not_ready(resp: RawResponse) -> None:
    assert resp.status == 503, resp
    assert json.loads(resp.body)["error"] == "not_ready", resp.body
    assert resp.header("Connection") == "close"
    assert resp.header("Retry-After") == "1"


@pytest.mark.timeout(40)
def test_a_head_still_arriving_when_the_drain_delay_ends_gets_not_ready(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("d-a", "a-1")
    gw = static_gateways([group_of("d-a", [pod.address])], env=DRAIN)
    request = build_request("POST", "/late", [("User-ID", "late")], b"{}")
    with RawConn(gw.port) as conn:
        conn.send(request[:20])  # the head has begun: the connection is not idle
        gw.expect_exit = True
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: readyz(gw.admin_port) == 503), "/readyz still 200"
        assert wait_for(lambda: connect_refused(gw.port)), "still accepting after the drain delay"
        conn.send(request[20:])
        _assert_not_ready(conn.read_response("POST"))
        assert conn.wait_closed(5)[0]
    assert not pod.hits(lambda h: h.path == "/late"), "a request that arrived after the drain was forwarded"
    assert gw.proc.wait(20) == 0


@pytest.mark.timeout(40)
def test_a_request_pipelined_behind_a_stream_past_the_drain_delay_gets_not_ready(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("d-b", "b-1")
    gw = static_gateways([group_of("d-b", [pod.address])], env=DRAIN)
    with RawConn(gw.port) as conn:
        conn.send(build_request("GET", "/stream?chunks=8&interval=0.5", [("User-ID", "streamer")]))
        stream = conn.read_head()  # sent before SIGTERM: it promised nothing about closing
        assert stream.status == 200 and stream.header("Connection") != "close", stream
        gw.expect_exit = True
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: connect_refused(gw.port)), "still accepting after the drain delay"
        conn.send(build_request("POST", "/pipelined", [("User-ID", "pipelined")], b"{}"))
        conn.read_body(stream, "GET")
        assert stream.chunked and len(stream.body) > 0
        _assert_not_ready(conn.read_response("POST"))
        assert conn.wait_closed(5)[0]
    assert not pod.hits(lambda h: h.path == "/pipelined")
    assert gw.proc.wait(20) == 0
