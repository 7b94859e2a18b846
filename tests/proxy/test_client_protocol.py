"""The client-side protocol in-process: pipelining, flow control, pooling, failures."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.observability.metrics import Metrics
from gateway.proxy.exchange import DONE
from gateway.proxy.flow import CLIENT_SLOW, PIPELINE
from tests.proxy.harness import KEY_HEADER, Harness, harness, responses_in


@pytest.fixture
def plane() -> Iterator[Harness]:
    with harness() as h:
        yield h


def get(path: str, key: str = "alice") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n%s: %s\r\n\r\n" % (
        path.encode(),
        KEY_HEADER.encode(),
        key.encode(),
    )


def test_pipelined_requests_are_answered_in_order_and_hold_reading_back(plane: Harness) -> None:
    client, transport = plane.connect()
    client.data_received(get("/1") + get("/2") + get("/3"))
    assert client.flow.read_blocks & PIPELINE, "reading must pause while requests wait their turn"
    plane.wait_for(lambda: len(responses_in(transport.written)) == 3)
    assert [h.request_line for h in plane.upstream.heads] == [
        b"GET /1 HTTP/1.1",
        b"GET /2 HTTP/1.1",
        b"GET /3 HTTP/1.1",
    ]
    assert not client.flow.read_blocks and transport.reading
    assert client.exchanges == []


def test_the_upstream_connection_is_pooled_and_reused(plane: Harness) -> None:
    client, transport = plane.connect()
    for n in range(3):
        plane.feed(client, [get(f"/reuse/{n}")])
        plane.wait_for(lambda n=n: len(responses_in(transport.written)) == n + 1)
    assert plane.metrics.upstream_connects == 1
    [pod] = plane.holder.current.groups["g1"].pods  # type: ignore[union-attr]
    assert plane.ctx.pools.stats(pod) == (0, 1, 1)  # nothing in flight; one connection, idle


def test_a_slow_client_pauses_the_upstream_read(plane: Harness) -> None:
    client, transport = plane.connect()
    client.data_received(get("/hold/slow"))
    plane.wait_for(lambda: len(plane.upstream.heads) == 1)
    conn = client.exchanges[0].upstream
    assert conn is not None
    client.pause_writing()  # the client's transport buffer is full
    assert conn.flow.read_blocks & CLIENT_SLOW
    plane.upstream.release.set()
    plane.run(asyncio.sleep(0.2))  # the response is sent, but not read while the client is full
    assert transport.written == b"" and not conn.transport.is_reading()  # type: ignore[union-attr]
    client.resume_writing()
    assert not conn.flow.read_blocks & CLIENT_SLOW
    plane.wait_for(lambda: len(responses_in(transport.written)) == 1)


def test_a_bug_handling_an_upstream_response_is_a_logged_500(
    plane: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("a bug in the response path")

    # The first response head of a pod makes its latency histogram: a Python-level call in both
    # builds (the compiled data plane calls its own functions directly, past module globals).
    monkeypatch.setattr(Metrics, "response_headers", broken)
    client, transport = plane.connect()
    with caplog.at_level(logging.ERROR):
        client.data_received(get("/bug"))
        plane.wait_for(lambda: transport.closed or bool(responses_in(transport.written)))
    [(status, _, body)] = responses_in(transport.written)
    assert status == 500 and json.loads(body)["error"] == "internal_error"
    assert any("a bug in the response path" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert plane.metrics.refusals == {"internal_error": 1}


def test_a_client_that_goes_away_mid_request_is_counted_and_releases_its_pod(plane: Harness) -> None:
    client, transport = plane.connect()
    client.data_received(b"POST /gone HTTP/1.1\r\nHost: a\r\nUser-ID: bob\r\nContent-Length: 10\r\n\r\n12345")
    plane.wait_for(lambda: client.exchanges and client.exchanges[0].upstream is not None)
    exchange = client.exchanges[0]
    [pod] = plane.holder.current.groups["g1"].pods  # type: ignore[union-attr]
    assert pod.inflight == 1
    transport.abort()
    plane.wait_for(lambda: client.closed and exchange.state == DONE)
    assert pod.inflight == 0
    stats = plane.metrics.write_routes["g1"]
    assert stats.codes[3] == 1  # a client that went away counts as 4xx (499)
