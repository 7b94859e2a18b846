"""Errors through the real gateway: bad input, limits, upstream failures, timeouts, retries.

After every error the gateway must still serve (invariant 6: a clear error, never a crash or a
desync), and it must never report success for something it did not deliver (invariant 4).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from typing import Any

import pytest

from tests.integration.conftest import (
    KEY_HEADER,
    NO_EJECTION,
    Gateway,
    GatewayFactory,
    LiveGroups,
    UpstreamFactory,
    all_requests,
    assert_json_error,
    assert_serves,
    group_of,
    http_request,
)
from tests.integration.upstream import IncompleteResponse, RawConn, RawResponse, build_request, wait_until

pytestmark = pytest.mark.timeout(60)

MAX_HEADER = 8192
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def live(module_upstreams: UpstreamFactory) -> LiveGroups:
    a, b = module_upstreams("err-1", 2), module_upstreams("err-2", 2)
    return LiveGroups(a + b, [group_of("err-1", a), group_of("err-2", b)])


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, live: LiveGroups) -> Gateway:
    return module_gateway(
        live.groups,
        env={"SHARDGATE_MAX_HEADER_BYTES": str(MAX_HEADER), "SHARDGATE_MAX_BODY_BYTES": str(MAX_BODY)},
        health=NO_EJECTION,
    )


@pytest.fixture(scope="module")
def gw_timeouts(module_gateway: GatewayFactory, live: LiveGroups) -> Gateway:
    return module_gateway(
        live.groups,
        env={
            "SHARDGATE_UPSTREAM_TIMEOUT": "0.5",
            "SHARDGATE_CLIENT_HEADER_TIMEOUT": "0.5",
            "SHARDGATE_CLIENT_IDLE_TIMEOUT": "1.0",
        },
        health=NO_EJECTION,
    )


@pytest.fixture(scope="module")
def faulty(module_upstreams: UpstreamFactory) -> LiveGroups:
    """``half``: one endpoint refuses connections, one works; ``whole``: two live pods;
    ``gone``: only refusing endpoints."""
    half_live = module_upstreams.one("half", "half-live")
    whole = module_upstreams("whole", 2)
    groups = [
        group_of("half", [module_upstreams.dead_port(), half_live]),
        group_of("whole", whole),
        group_of("gone", [module_upstreams.dead_port()]),
    ]
    return LiveGroups([half_live, *whole], groups)


@pytest.fixture(scope="module")
def gw_faulty(module_gateway: GatewayFactory, faulty: LiveGroups) -> Gateway:
    # reads: owner, so that a read's pod choice (and any retry) stays inside the owner group.
    return module_gateway(faulty.groups, reads="owner", health=NO_EJECTION)


def _serves(gw: Gateway, setup: LiveGroups) -> None:
    key = setup.recipe.keys_owned_by(setup.groups[0].name if setup.groups[0].name != "half" else "whole", 1)[
        0
    ]
    assert_serves(gw, key)


def _send_raw(gw: Gateway, data: bytes, method: str = "GET") -> tuple[RawResponse, bool]:
    """Send bytes on a fresh connection; the response and whether the gateway closed afterwards."""
    with RawConn(gw.port) as conn:
        conn.send(data)
        resp = conn.read_response(method)
        closed, _ = conn.wait_closed(5.0) if resp.status >= 400 else (False, b"")
        return resp, closed


def test_upstream_silent_mid_body_is_cut_off(gw_timeouts: Gateway, live: LiveGroups) -> None:
    """Headers and part of the body, then silence: after the 0.5 s upstream timeout the
    client's connection is closed with the body short (never completed, never left hanging).
    The upstream stays silent, its connection open, for ten minutes: a close before that is the
    gateway's."""
    with socket.create_connection(("127.0.0.1", gw_timeouts.port), timeout=30) as sock:
        sock.sendall(
            build_request("GET", "/truncate?size=100000&send=5000&stall=600", [(KEY_HEADER, "stall")])
        )
        received = b""
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert 0 < len(body) < 100000, len(body)
    _serves(gw_timeouts, live)


# ---------------------------------------------------------------------------------------------
# Malformed requests


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS ClientHello
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\x01\x02garbage after a request\r\n\r\n",
    ],
    ids=["word", "header-line", "nul", "tls", "after-request"],
)
def test_malformed_requests_get_400_and_the_gateway_keeps_serving(
    gw: Gateway, live: LiveGroups, garbage: bytes
) -> None:
    keeper = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        assert http_request(keeper, "GET", "/before-garbage").status == 200
        with RawConn(gw.port) as conn:
            conn.send(garbage)
            if garbage.endswith(b"\r\n\r\n") and b"after a request" in garbage:
                first = conn.read_response()
                assert first.status == 200  # the valid request before the garbage is served
            resp = conn.read_response()
            assert_json_error(resp.status, resp.headers, resp.body, 400, "bad_request")
            closed, _ = conn.wait_closed(5.0)
            assert closed, "after a framing error the connection cannot be trusted and must be closed"
        # Other connections, old and new, are unaffected.
        assert http_request(keeper, "GET", "/after-garbage").status == 200
    finally:
        keeper.close()
    _serves(gw, live)


@pytest.mark.parametrize(
    "framing",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
    ],
    ids=["cl-te", "te-cl"],
)
def test_content_length_with_transfer_encoding_is_rejected(
    gw: Gateway, live: LiveGroups, framing: list[tuple[str, str]]
) -> None:
    smuggled = build_request("GET", "/smuggled")
    data = build_request("POST", "/cl-te", [(KEY_HEADER, "smuggle"), *framing]) + b"0\r\n\r\n" + smuggled
    resp, closed = _send_raw(gw, data, "POST")
    assert_json_error(resp.status, resp.headers, resp.body, 400, "bad_request")
    assert closed
    assert not all_requests(live.servers, lambda r: r.path in ("/cl-te", "/smuggled"))
    _serves(gw, live)


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "5 6", "0x10"])
def test_invalid_content_length_is_rejected(gw: Gateway, live: LiveGroups, value: str) -> None:
    data = build_request("POST", "/bad-cl", [(KEY_HEADER, "cl"), ("Content-Length", value)]) + b"hello"
    resp, _ = _send_raw(gw, data, "POST")
    assert_json_error(resp.status, resp.headers, resp.body, 400, "bad_request")
    assert not all_requests(live.servers, lambda r: r.path == "/bad-cl")
    _serves(gw, live)


def test_conflicting_duplicate_content_length_is_rejected(gw: Gateway, live: LiveGroups) -> None:
    data = (
        build_request(
            "POST", "/dup-cl", [(KEY_HEADER, "cl"), ("Content-Length", "5"), ("Content-Length", "6")]
        )
        + b"hello!"
    )
    resp, _ = _send_raw(gw, data, "POST")
    assert_json_error(resp.status, resp.headers, resp.body, 400, "bad_request")
    assert not all_requests(live.servers, lambda r: r.path == "/dup-cl")


# ---------------------------------------------------------------------------------------------
# Limits


def test_headers_over_the_limit_get_431(gw: Gateway, live: LiveGroups) -> None:
    # Under the limit: forwarded intact.
    value = "v" * (MAX_HEADER - 2048)
    result = http_request(gw.port, "GET", "/big-header-ok", {"X-Big": value})
    assert result.status == 200
    (req,) = all_requests(live.servers, lambda r: r.path == "/big-header-ok")
    assert req.header("X-Big") == value

    one_big = build_request("GET", "/too-big-header", [("X-Big", "v" * (MAX_HEADER + 2000))])
    many = build_request(
        "GET", "/too-many-headers", [(f"X-H-{i}", "v" * 50) for i in range(MAX_HEADER // 50 + 20)]
    )
    for data in (one_big, many):
        resp, _ = _send_raw(gw, data)
        assert_json_error(resp.status, resp.headers, resp.body, 431, "headers_too_large")
    assert not all_requests(live.servers, lambda r: r.path in ("/too-big-header", "/too-many-headers"))
    _serves(gw, live)


def test_an_unfinished_head_over_the_limit_gets_431_at_once(gw: Gateway, live: LiveGroups) -> None:
    # No blank line ever comes: the gateway must not wait for the end of a head that is
    # already too large (nor buffer more of it), whichever reads it arrives in.
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 100) for i in range(MAX_HEADER // 100 + 10))
    for pieces in ([fields], [fields[:1000], fields[1000:]]):
        with RawConn(gw.port) as conn:
            conn.send(b"GET /unfinished-head HTTP/1.1\r\nHost: gateway.test\r\n")
            for piece in pieces:
                conn.send(piece)
            resp = conn.read_response()
            assert_json_error(resp.status, resp.headers, resp.body, 431, "headers_too_large")
            closed, _ = conn.wait_closed(5.0)
            assert closed
    assert not all_requests(live.servers, lambda r: r.path == "/unfinished-head")
    _serves(gw, live)


def test_declared_body_over_the_limit_gets_413_without_sending_it(gw: Gateway, live: LiveGroups) -> None:
    # Exactly at the limit is fine.
    body = b"b" * MAX_BODY
    result = http_request(gw.port, "POST", "/at-limit", {KEY_HEADER: "limit"}, body)
    assert result.status == 200
    assert result.json()["body_length"] == MAX_BODY

    for extra in ([], [("Expect", "100-continue")]):
        with RawConn(gw.port) as conn:
            conn.send(
                build_request(
                    "POST",
                    "/over-limit",
                    [(KEY_HEADER, "limit"), ("Content-Length", str(MAX_BODY + 1)), *extra],
                )
            )
            resp = conn.read_response("POST")  # answered from the headers: the body is never sent
            assert_json_error(resp.status, resp.headers, resp.body, 413, "body_too_large")
            assert 100 not in resp.informational
    assert not all_requests(live.servers, lambda r: r.path == "/over-limit")
    _serves(gw, live)


def test_chunked_body_over_the_limit_gets_413(gw: Gateway, live: LiveGroups) -> None:
    piece = b"c" * 65536
    with RawConn(gw.port, timeout=20) as conn:
        conn.send(
            build_request(
                "POST", "/chunked-over", [(KEY_HEADER, "chunked-limit"), ("Transfer-Encoding", "chunked")]
            )
        )
        stop = threading.Event()

        def sender() -> None:
            # Keep sending past the limit until the gateway answers or closes.
            with contextlib.suppress(OSError):
                for _ in range(2 * MAX_BODY // len(piece) + 8):
                    if stop.is_set():
                        return
                    conn.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.sock.sendall(b"0\r\n\r\n")

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            resp = conn.read_response("POST")
        finally:
            stop.set()
            thread.join(10)
        assert_json_error(resp.status, resp.headers, resp.body, 413, "body_too_large")
    # Whatever part of the body an upstream may have seen, it never saw a complete request.
    assert not all_requests(live.servers, lambda r: r.path == "/chunked-over")
    _serves(gw, live)


# ---------------------------------------------------------------------------------------------
# Upstream failures


def test_refused_upstream_gets_502(gw_faulty: Gateway, faulty: LiveGroups) -> None:
    for i, key in enumerate(faulty.recipe.keys_owned_by("gone", 5, prefix="refused")):
        result = http_request(
            gw_faulty.port,
            "POST" if i % 2 else "GET",
            "/refused",
            {KEY_HEADER: key},
            b"{}" if i % 2 else None,
        )
        assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
    assert not all_requests(faulty.servers, lambda r: r.path == "/refused")
    _serves(gw_faulty, faulty)


def _read_truncated(gw: Gateway, request: bytes, method: str) -> None:
    """The upstream dies mid-body: the client must never see a complete (fake) success."""
    with RawConn(gw.port) as conn:
        conn.send(request)
        try:
            resp = conn.read_response(method)
        except IncompleteResponse:
            return  # headers (maybe) and part of the body, then the connection closed: correct
        assert resp.status == 502, f"a truncated upstream response was reported as {resp.status}"
        assert_json_error(resp.status, resp.headers, resp.body, 502, "upstream_error")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upstream_closing_mid_response_closes_the_client_connection(
    gw: Gateway, live: LiveGroups, chunked: bool
) -> None:
    query = "size=100000&send=5000" + ("&chunked=1" if chunked else "")
    _read_truncated(gw, build_request("GET", f"/truncate?{query}"), "GET")
    _read_truncated(gw, build_request("POST", f"/truncate?{query}", [(KEY_HEADER, "trunc")], b"{}"), "POST")
    _serves(gw, live)


def test_upstream_reset_gets_502_and_writes_are_not_resent(gw: Gateway, live: LiveGroups) -> None:
    for i in range(5):
        target = f"/reset?n={i}"
        result = http_request(gw.port, "POST", target, {KEY_HEADER: f"reset-{i}"}, b"{}")
        assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
        seen = [r for r in all_requests(live.servers) if r.target == target]
        assert len(seen) == 1, f"a write that reached an upstream was sent {len(seen)} times"
    # An idempotent read may be retried once on another pod, no more.
    result = http_request(gw.port, "GET", "/reset?n=get", {KEY_HEADER: "reset-get"})
    assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
    assert 1 <= len(all_requests(live.servers, lambda r: r.target == "/reset?n=get")) <= 2
    _serves(gw, live)


def test_invalid_upstream_response_gets_502(gw: Gateway, live: LiveGroups) -> None:
    result = http_request(gw.port, "POST", "/garbage", {KEY_HEADER: "garbage"}, b"{}")
    assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
    assert len(all_requests(live.servers, lambda r: r.path == "/garbage")) == 1
    _serves(gw, live)


def test_slow_upstream_headers_get_504(gw_timeouts: Gateway, live: LiveGroups) -> None:
    # The upstream would answer after ten minutes: any answer within the client's timeout is the
    # gateway's own, from its 0.5 s upstream timeout.
    result = http_request(
        gw_timeouts.port, "POST", "/slow-headers?delay=600", {KEY_HEADER: "slow"}, b"{}", timeout=30
    )
    assert_json_error(result.status, result.headers, result.body, 504, "upstream_timeout")
    # The write reached the upstream once; it is not re-sent after the timeout.
    assert len(all_requests(live.servers, lambda r: r.path == "/slow-headers")) == 1
    _serves(gw_timeouts, live)


# ---------------------------------------------------------------------------------------------
# Client timeouts


def test_client_stalling_in_headers_is_closed(gw_timeouts: Gateway, live: LiveGroups) -> None:
    started = time.monotonic()  # before the connection exists: no timer of it can start earlier
    with RawConn(gw_timeouts.port) as conn:
        conn.send(b"GET /stall HTTP/1.1\r\nHost: x\r\nX-Partial: yes\r\n")
        closed, data = conn.wait_closed(30.0)
        elapsed = time.monotonic() - started
    assert closed, "a client stalled in its headers was not closed"
    # A lower bound only: not closed before the header timeout (a loaded machine closes later).
    assert elapsed >= 0.4, f"closed after {elapsed:.2f}s, before the 0.5s header timeout"
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]
    assert not all_requests(live.servers, lambda r: r.path == "/stall")
    _serves(gw_timeouts, live)


def test_stalled_mid_body_gets_the_idle_timeout(module_gateway: GatewayFactory, live: LiveGroups) -> None:
    """Head and part of the body in one read, then silence: once the head is complete the
    client idle timeout (1 s here) applies, not the header timeout (0.5 s). (The upstream's
    timeout is long here: with gw_timeouts' 0.5 s the pod's wait for the body ends it first.)"""
    gw = module_gateway(
        live.groups,
        env={
            "SHARDGATE_UPSTREAM_TIMEOUT": "10",
            "SHARDGATE_CLIENT_HEADER_TIMEOUT": "0.5",
            "SHARDGATE_CLIENT_IDLE_TIMEOUT": "1.0",
        },
        health=NO_EJECTION,
    )
    with RawConn(gw.port) as conn:
        started = time.monotonic()  # before the head is sent: the idle timer starts after it
        head = build_request("POST", "/stall-body", [(KEY_HEADER, "stall"), ("Content-Length", "100")])
        conn.send(head + b"only part of the body")
        closed, _ = conn.wait_closed(30.0)
        elapsed = time.monotonic() - started
    assert closed, "a client stalled mid-body was not cut off"
    # A lower bound only: the idle timeout (1 s), not the header timeout (0.5 s), applied.
    assert elapsed >= 0.9, f"cut off after {elapsed:.2f}s, before the 1 s idle timeout"
    _serves(gw, live)


def test_client_dripping_headers_is_closed(gw_timeouts: Gateway) -> None:
    """The header timeout bounds the whole header block, not the gap between bytes: a client
    sending a header line every 0.1 s (well inside the 0.5 s header and 1 s idle timeouts) is
    closed while it is still dripping. A timer restarted per read would never fire."""
    with RawConn(gw_timeouts.port) as conn:
        conn.send(b"GET /drip HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 30.0
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                conn.sock.sendall(b"X-Drip: a\r\n")
            except OSError:  # the gateway closed (or reset) the connection under the drip
                closed = True
                break
            closed, _ = conn.wait_closed(0.1)
    assert closed, "a client dripping header bytes was never closed"


def test_idle_keepalive_client_is_closed(gw_timeouts: Gateway) -> None:
    with RawConn(gw_timeouts.port) as conn:
        started = time.monotonic()  # before the request: the idle timer starts after its response
        conn.send(build_request("GET", "/idle"))
        assert conn.read_response().status == 200
        closed, data = conn.wait_closed(30.0)
        elapsed = time.monotonic() - started
    assert closed, "an idle keep-alive connection was not closed"
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
    # A lower bound only: not closed before the 1 s idle timeout (a loaded machine closes later).
    assert elapsed >= 0.9, f"idle connection closed after {elapsed:.2f}s, before the 1s idle timeout"
    # A connection that never sends a byte is closed too.
    with RawConn(gw_timeouts.port) as conn:
        closed, _ = conn.wait_closed(30.0)
    assert closed


# ---------------------------------------------------------------------------------------------
# Retries inside the owner group


def test_refused_connection_is_retried_inside_the_owner_group(gw_faulty: Gateway, faulty: LiveGroups) -> None:
    keys = faulty.recipe.keys_owned_by("half", 60, prefix="retry")
    conn = http.client.HTTPConnection("127.0.0.1", gw_faulty.port, timeout=15)
    statuses: list[int] = []
    served: list[Any] = []
    try:
        for i, key in enumerate(keys):
            for method in ("GET", "POST"):
                result = http_request(
                    conn,
                    method,
                    f"/retry/{i}/{method}",
                    {KEY_HEADER: key},
                    b"{}" if method == "POST" else None,
                )
                statuses.append(result.status)
                if result.status == 200:
                    served.append(result.json()["pod"])
                    assert result.header("X-Shard-Group") == "half"
    finally:
        conn.close()
    assert statuses == [200] * len(statuses), f"{statuses.count(200)} of {len(statuses)} succeeded"
    assert set(served) == {"half-live"}
    recorded = all_requests(faulty.servers, lambda r: r.path.startswith("/retry/"))
    assert len(recorded) == 2 * len(keys), "each request must reach an upstream exactly once"
    assert {r.pod for r in recorded} == {"half-live"}, "a request left its owner group"
    _serves(gw_faulty, faulty)


# ---------------------------------------------------------------------------------------------
# Connect timeouts

CONNECT_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def holes(module_upstreams: UpstreamFactory) -> LiveGroups:
    """Endpoints whose TCP handshake never completes: ``hole-1`` one, ``hole-2`` two; ``mixed``
    one of those and a live pod; ``live`` two live pods."""
    mixed_live = module_upstreams.one("mixed", "mixed-live")
    live = module_upstreams("live", 2)
    groups = [
        group_of("hole-1", [module_upstreams.blackhole()]),
        group_of("hole-2", [module_upstreams.blackhole(), module_upstreams.blackhole()]),
        group_of("mixed", [module_upstreams.blackhole(), mixed_live]),
        group_of("live", live),
    ]
    return LiveGroups([mixed_live, *live], groups)


@pytest.fixture(scope="module")
def gw_holes(module_gateway: GatewayFactory, holes: LiveGroups) -> Gateway:
    # The response timeout is long: a 504 well before it can only be the connect timeout's.
    # reads: owner, so that a read's attempts stay inside the owner group too.
    return module_gateway(
        holes.groups,
        reads="owner",
        env={"SHARDGATE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "SHARDGATE_UPSTREAM_TIMEOUT": "120"},
        health=NO_EJECTION,
    )


def _connect_counters(gw: Gateway) -> tuple[float, float, float]:
    return (
        gw.metric("shardgate_upstream_connect_failures_total"),
        gw.metric("shardgate_upstream_retries_total"),
        gw.metric("shardgate_refusals_total", reason="upstream_timeout"),
    )


@pytest.mark.parametrize("group", ["hole-1", "hole-2"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_connect_timeout_is_retried_once_then_answered_504(
    gw_holes: Gateway, holes: LiveGroups, group: str, method: str
) -> None:
    """No pod of the group completes a handshake: the first connect times out, the request is
    tried once more (on the group's other pod; a one-pod group's retry is a fresh connection to
    the same pod), that one times out too, and the client gets the contract's 504."""
    for key in holes.recipe.keys_owned_by(group, 2, prefix=f"hole-{method}"):
        failures, retries, timeouts = _connect_counters(gw_holes)
        result = http_request(
            gw_holes.port,
            method,
            "/connect-timeout",
            {KEY_HEADER: key, "X-Request-ID": f"ct-{key}"},
            b"{}" if method == "POST" else None,
            timeout=60,
        )
        doc = assert_json_error(result.status, result.headers, result.body, 504, "upstream_timeout")
        assert doc["request_id"] == f"ct-{key}", doc
        assert set(doc) == {"error", "detail", "request_id"}, doc
        assert "json" in (result.header("Content-Type") or ""), result.headers
        # Two connect attempts, one of them a retry; one 504 counted (before it was sent).
        after = _connect_counters(gw_holes)
        assert (after[0] - failures, after[1] - retries, after[2] - timeouts) == (2, 1, 1), after
    assert not all_requests(holes.servers, lambda r: r.path == "/connect-timeout")
    assert_serves(gw_holes, holes.recipe.keys_owned_by("live", 1)[0])


def test_connect_timeout_is_retried_on_the_groups_other_pod(gw_holes: Gateway, holes: LiveGroups) -> None:
    """``mixed`` = a pod whose handshake never completes + a live pod. A request kept in flight
    on the live pod makes the pod choice (least in-flight of two) pick the silent pod first; the
    connect times out and the retry goes to the live pod, which serves the request."""
    (live_pod,) = [s for s in holes.servers if s.group == "mixed"]
    key = holes.recipe.keys_owned_by("mixed", 1, prefix="mixed")[0]
    with RawConn(gw_holes.port, timeout=60) as held:
        held.send(build_request("GET", "/slow-headers?delay=60", [(KEY_HEADER, key)]))
        assert wait_until(lambda: any(r.path == "/slow-headers" for r in live_pod.requests()), 15), (
            "the held request never reached the live pod"
        )
        for i in range(3):
            failures, retries, _ = _connect_counters(gw_holes)
            result = http_request(gw_holes.port, "POST", f"/mixed/{i}", {KEY_HEADER: key}, b"{}", timeout=60)
            assert result.status == 200, result.body[:300]
            assert result.json()["pod"] == "mixed-live"
            after = _connect_counters(gw_holes)
            assert (after[0] - failures, after[1] - retries) == (1, 1), (after, failures, retries)
    recorded = all_requests(holes.servers, lambda r: r.path.startswith("/mixed/"))
    assert sorted(r.path for r in recorded) == ["/mixed/0", "/mixed/1", "/mixed/2"], recorded
