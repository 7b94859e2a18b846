"""SIGTERM to a gateway replica under load, as Kubernetes stops a pod behind a Service.

Two gateway replicas on the same config; the client behind the "Service" opens new connections
only to replicas whose ``/readyz`` is 200 (an endpoints controller polls it) and keeps its
open keep-alive connections where they are, as kube-proxy does. The first replica gets SIGTERM
while a slow streamed response, a held request and the client's load are in flight.
Contract (DESIGN "Lifecycle"): ``/readyz`` turns 503 at once; the replica keeps serving for the
drain delay; then it stops accepting, answers what is in flight (``Connection: close``), closes
idle keep-alive connections and exits 0. A second SIGTERM or SIGINT exits at once.

No check here depends on how fast the machine is: what must happen inside the drain delay gets
a delay long enough for a loaded machine, what must outlive it is held by a gate the test opens
once the drain is over, and durations are only checked from below (a wait that was honoured).
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest

from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.integration.conftest import Recipe, group_of
from tests.lifecycle.conftest import (
    DEADLINE,
    Background,
    ConnectionFailed,
    Outcome,
    ServiceClient,
    TrackedConn,
    UpstreamSet,
    connect_refused,
    one_request,
    readyz,
    wait_for,
)

DRAIN_DELAY = 6.0  # the checks made while the replica drains take well under a second
# A chunk every 0.5 s; the last one waits for the gate "stream", opened after the drain delay.
STREAM_CHUNKS, STREAM_INTERVAL = 10, 0.5


def read_stream(port: int) -> dict[str, Any]:
    """GET the slow stream through the gateway on a fresh connection; what arrived, and when."""
    with TrackedConn(port, timeout=60) as conn:
        started = time.monotonic()
        target = f"/stream?chunks={STREAM_CHUNKS}&interval={STREAM_INTERVAL}&gate=stream"
        resp = conn.request("GET", target, "streamer")
        ended = time.monotonic()
        closed, extra = conn.wait_closed(10)
        return {
            "status": resp.status,
            "body": resp.body,
            "chunked": resp.chunked,
            "started": started,
            "ended": ended,
            "closed_after": closed,
            "extra": extra,
        }


@pytest.mark.timeout(90)
def test_sigterm_under_load_drains_in_flight_requests_while_the_other_replica_takes_over(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pods = [upstreams("g-a", "a-1"), upstreams("g-b", "b-1")]
    groups = [group_of("g-a", [pods[0].address]), group_of("g-b", [pods[1].address])]
    recipe = Recipe(groups)
    env = {"SHARDGATE_DRAIN_DELAY": str(DRAIN_DELAY), "SHARDGATE_GRACE_TIMEOUT": "15"}
    gw1, gw2 = static_gateways(groups, env=env), static_gateways(groups, env=env)
    keys = recipe.keys_owned_by("g-a", 6) + recipe.keys_owned_by("g-b", 6)
    key = keys[0]

    # In flight on gw1 before SIGTERM: the slow stream; a kept-alive connection (one request
    # done) that will carry a held request across the end of the drain delay; an idle one.
    stream = Background(lambda: read_stream(gw1.port), name="stream")
    assert wait_for(lambda: len(upstreams.hits(lambda h: h.path == "/stream")) == 1), "stream never started"
    probe, idle = TrackedConn(gw1.port), TrackedConn(gw1.port)
    for conn in (probe, idle):
        resp = conn.request("GET", "/orders", key)
        assert resp.status == 200 and not resp.closes, resp

    times: dict[str, float] = {}

    def unaccepted(outcome: Outcome) -> bool:
        """The gateway never took this request: it closed the idle kept-alive connection (at the
        end of the drain) before reading it. Checked again, strictly, at the end."""
        stopping = times.get("sigterm", float("inf")) + DRAIN_DELAY - 0.2
        return (
            outcome.port == gw1.port
            and outcome.reused
            and not outcome.got_bytes
            and outcome.started >= stopping
            and not upstreams.hits(lambda h: h.request_id == outcome.request_id)
        )

    client = ServiceClient({gw1.port: gw1.admin_port, gw2.port: gw2.admin_port}, keys, unaccepted, threads=3)
    held: Background | None = None
    try:
        with client:
            assert client.progress(100), "no load"
            times["sigterm"] = time.monotonic()
            gw1.proc.send_signal(signal.SIGTERM)
            gw1.expect_exit = True

            # Not ready ...
            assert wait_for(lambda: readyz(gw1.admin_port) == 503), "/readyz still 200"
            times["unready"] = time.monotonic()
            # ... while still serving, on new connections too, during the drain delay (so
            # readiness turned off first); each response asks the client to reconnect.
            resp = one_request(gw1.port, "POST", "/orders", key)
            assert resp.status == 200 and resp.header("X-Shard-Group") == recipe.owner(key), resp
            assert resp.closes, f"no Connection: close during the drain delay: {resp.headers}"
            # Accepted during the drain delay, answered after it (the pod holds it).
            held = Background(lambda: probe.request("POST", "/hold?gate=probe", key), name="held")
            assert wait_for(lambda: len(upstreams.hits(lambda h: h.path == "/hold")) == 1), "held never sent"

            # After the drain delay: no more connections accepted; idle keep-alives are closed.
            assert wait_for(lambda: connect_refused(gw1.port), timeout=DRAIN_DELAY + DEADLINE), (
                "still accepting"
            )
            times["refused"] = time.monotonic()
            closed, data = idle.wait_closed(DEADLINE)
            assert closed and data == b"", ("idle keep-alive connection not closed", data)
            assert gw1.alive(), "gw1 exited with requests in flight"
            # The held request completes, and says the connection closes.
            for pod in pods:
                pod.release("probe")
            answer = held.result(DEADLINE)
            assert answer.status == 200 and answer.closes, (answer.status, answer.headers)
            assert probe.wait_closed(DEADLINE)[0], "connection kept open after Connection: close"

            # The stream, in flight across the end of the drain delay, finishes whole; then gw1
            # exits, with 0.
            assert not stream.done(), "the stream ended before its gate was opened"
            for pod in pods:
                pod.release("stream")
            streamed = stream.result(DEADLINE * 2)
            assert gw1.proc.wait(DEADLINE * 2) == 0, gw1.log_tail()
            times["exited"] = time.monotonic()
            assert client.progress(100), "the client stalled after gw1 left"
    finally:
        for pod in pods:
            pod.release("probe")
            pod.release("stream")
        probe.close()
        idle.close()
    outcomes = client.outcomes
    print(
        f"\nsigterm->503 {times['unready'] - times['sigterm']:.3f}s, ->refused "
        f"{times['refused'] - times['sigterm']:.3f}s, ->exit {times['exited'] - times['sigterm']:.3f}s; "
        f"{len(outcomes)} requests, {sum(o.status != 200 for o in outcomes)} unaccepted and retried, "
        f"{client.stale_reconnects} kept-alive connections found closed before reuse"
    )

    expected = b"".join(b"chunk %d of %d\n" % (i + 1, STREAM_CHUNKS) for i in range(STREAM_CHUNKS))
    assert streamed["status"] == 200 and streamed["chunked"] and streamed["body"] == expected, streamed
    assert streamed["ended"] - streamed["started"] >= STREAM_CHUNKS * STREAM_INTERVAL * 0.9
    assert streamed["closed_after"] and streamed["extra"] == b"", "stream connection not closed cleanly"
    assert streamed["ended"] > times["refused"], "the stream was not in flight when gw1 stopped accepting"
    assert times["refused"] - times["sigterm"] >= DRAIN_DELAY - 0.1, "stopped accepting before the drain"

    # The client saw no failure at all: during the drain delay every response said
    # Connection: close, so no kept-alive connection was left for the gateway to cut.
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:5]
    for o in outcomes:
        if o.status == 200 and o.method == "POST":
            assert o.group == recipe.owner(o.key), o
    gw1_in_drain = [
        o for o in outcomes if o.port == gw1.port and o.status == 200 and o.started > times["sigterm"]
    ]
    assert gw1_in_drain, "no client request was served by gw1 during its drain delay"
    assert any(o.port == gw2.port and o.started > times["exited"] for o in outcomes)
    # New connections stopped going to gw1 once the client's endpoints controller saw it not
    # ready (a connection picked before that may still open to it, and is served).
    assert gw1.port in client.unready_at, "the endpoints controller never saw gw1 not ready"
    late_new = [o for o in outcomes if o.port == gw1.port and o.picked > client.unready_at[gw1.port]]
    assert not late_new, late_new[:3]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_exits_at_once(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory, second: signal.Signals
) -> None:
    pod = upstreams("g-a", "a-1")
    gw = static_gateways(
        [group_of("g-a", [pod.address])],
        # Exiting at all before the test's deadline is "at once" next to these.
        env={"SHARDGATE_DRAIN_DELAY": "600", "SHARDGATE_GRACE_TIMEOUT": "600"},
    )
    held = Background(lambda: one_request(gw.port, "GET", "/hold?gate=never", "k"), name="held")
    try:
        assert wait_for(lambda: len(pod.hits(lambda h: h.path == "/hold")) == 1), "held never sent"
        gw.expect_exit = True
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: readyz(gw.admin_port) == 503), "/readyz still 200"
        assert gw.alive(), "the first SIGTERM must drain, not exit"
        sent = time.monotonic()
        gw.proc.send_signal(second)
        try:
            code = gw.proc.wait(2 * DEADLINE)  # the drain delay alone is 600 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {2 * DEADLINE} s after a second {second.name}:\n{gw.log_tail()}")
        print(f"\nexit {code} {time.monotonic() - sent:.3f}s after the second {second.name}")
        assert f"second {second.name}: exiting at once" in gw.log_tail(100), gw.log_tail()
        # The request in flight is cut off (or refused), never answered as if it had succeeded.
        try:
            cut = held.result(10)
        except ConnectionFailed:
            pass
        else:
            assert cut.status != 200, cut
    finally:
        pod.release("never")


@pytest.mark.timeout(30)
def test_keep_alive_connections_are_told_to_close_during_the_drain_delay(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("g-a", "a-1")
    gw = static_gateways(
        # A drain delay far longer than the test, so the request below is certain to fall in it
        # (the fixture's SIGTERM at teardown is a second signal: it exits at once).
        [group_of("g-a", [pod.address])],
        env={"SHARDGATE_DRAIN_DELAY": "600", "SHARDGATE_GRACE_TIMEOUT": "5"},
    )
    with TrackedConn(gw.port) as conn:
        first = conn.request("POST", "/orders", "k")
        assert first.status == 200 and not first.closes, first
        gw.expect_exit = True
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: readyz(gw.admin_port) == 503), "/readyz still 200"
        # Still served during the drain delay, but the client is asked to reconnect (elsewhere:
        # the Service no longer lists this replica), so that no busy keep-alive connection is
        # left to be closed under its client when the drain delay ends.
        during = conn.request("POST", "/orders", "k")
        assert during.status == 200, during
        assert during.closes, f"no Connection: close during the drain delay: {during.headers}"
        assert conn.wait_closed(DEADLINE)[0], "the connection stayed open after Connection: close"
        assert gw.alive(), "the drain delay is not over"


@pytest.mark.timeout(60)
def test_requests_outliving_the_grace_timeout_are_cut_off_and_the_gateway_exits_0(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    """Drain delay, then the grace timeout, then whatever is still in flight is cut: the client
    sees its connection end without a complete response (never a fake end of a body), the log
    says how many were cut, and the process exits 0."""
    drain, grace = 0.5, 1.5
    pod = upstreams("g-a", "a-1")
    gw = static_gateways(
        [group_of("g-a", [pod.address])],
        env={"SHARDGATE_DRAIN_DELAY": str(drain), "SHARDGATE_GRACE_TIMEOUT": str(grace)},
    )
    # In flight at SIGTERM, both far longer than drain + grace: a request whose upstream never
    # answers, and a response streaming a chunk every 0.1 s for a minute.
    held = Background(lambda: one_request(gw.port, "GET", "/hold?gate=never", "held"), name="held")
    streamer = TrackedConn(gw.port, timeout=60)
    stream = Background(
        lambda: streamer.request("GET", "/stream?chunks=600&interval=0.1", "stream"), name="stream"
    )
    try:
        assert wait_for(lambda: {h.path for h in pod.hits()} >= {"/hold", "/stream"}), pod.hits()
        assert wait_for(lambda: streamer.received > 0), "the stream's head never arrived"
        gw.expect_exit = True
        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            code = gw.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running 30 s after SIGTERM (drain {drain} s + grace {grace} s):\n{gw.log_tail()}"
            )
        elapsed = time.monotonic() - signalled
        assert code == 0, gw.log_tail()
        # A lower bound only: the in-flight requests got the whole drain delay and grace timeout.
        assert elapsed >= drain + grace - 0.1, f"exited {elapsed:.2f}s after SIGTERM"

        with pytest.raises(ConnectionFailed) as no_answer:
            held.result(10)
        assert not no_answer.value.got_bytes, "a request without an upstream answer got some response"
        with pytest.raises(ConnectionFailed) as cut:
            stream.result(10)
        assert cut.value.got_bytes, "the stream's head and first chunks had arrived"
        assert streamer.eof, "the stream's connection must be closed, not left hanging"
    finally:
        pod.release("never")
        streamer.close()
    log = gw.log_tail(200)
    assert "grace timeout: closing 2 connections still busy" in log, log
    assert '"message":"stopped"' in log, log
