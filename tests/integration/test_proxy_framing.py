"""HTTP/1.1 framing through the real gateway: bodies, HEAD/204/304, 100-continue, pipelining,
connection management, and streaming with bounded memory in both directions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from typing import Any

import pytest

from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    LiveGroups,
    UpstreamFactory,
    all_requests,
    group_of,
    http_request,
)
from tests.integration.upstream import (
    HEAD_BODY,
    RawConn,
    build_request,
    chunked_body,
    pattern,
    sha256,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

MB = 1024 * 1024
BIG = 10 * MB
# Peak RSS growth allowed while 10 MiB stream through. Measured on this gateway: < 0.2 MiB (a
# few 64-256 KiB read buffers, reused). A gateway without flow control holds in memory whatever
# the kernel does not: socket send buffers autotune up to tcp_wmem's maximum (4 MiB here), and
# the pods and the slow client use small fixed receive buffers, so such a gateway grows by
# 5.5-6.5 MiB (measured by disabling pause_reading in a copy of the gateway). 3 MiB sits between
# the two with a wide margin on the good side.
MAX_PEAK_GROWTH = 3 * MB


@pytest.fixture(scope="module")
def pods(module_upstreams: UpstreamFactory) -> LiveGroups:
    # Small, fixed receive buffers: a slow pod really pushes back (instead of the kernel
    # autotuning its buffer up to tcp_rmem's maximum and absorbing a whole upload).
    small = 64 * 1024
    a = module_upstreams("frame-1", 2, rcvbuf=small, stream_limit=small)
    b = module_upstreams("frame-2", 2, rcvbuf=small, stream_limit=small)
    return LiveGroups(a + b, [group_of("frame-1", a), group_of("frame-2", b)])


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, pods: LiveGroups) -> Gateway:
    return module_gateway(pods.groups)


def _recorded(pods: LiveGroups, path: str) -> list[Any]:
    return all_requests(pods.servers, lambda r: r.path == path)


def test_content_length_request_body(gw: Gateway, pods: LiveGroups) -> None:
    body = os.urandom(200_000)
    result = http_request(gw.port, "POST", "/cl-body", {KEY_HEADER: "cl"}, body)
    assert result.status == 200
    echo = result.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == sha256(body)
    (req,) = _recorded(pods, "/cl-body")
    assert req.body == body
    assert req.group == pods.recipe.owner("cl")


def test_request_arriving_in_pieces_is_forwarded_intact(gw: Gateway, pods: LiveGroups) -> None:
    """Reads that end inside the method, the target, a header and the body: the request (and
    the next one on the connection) reach the owner group whole."""
    with RawConn(gw.port) as conn:
        for round_ in range(2):
            key = f"pieces-{round_}"
            target = f"/in-pieces/{round_}?q=" + "x" * 300
            body = os.urandom(3000)
            request = build_request("POST", target, [(KEY_HEADER, key), ("X-Trace-Me", "yes")], body)
            cuts = [2, 9, 120, request.index(b"\r\n\r\n") - 3, len(request) - 1000]
            for start, stop in zip([0, *cuts], [*cuts, len(request)], strict=True):
                conn.send(request[start:stop])
                time.sleep(0.02)  # (pacing only: each piece should arrive as its own read)
            resp = conn.read_response("POST")
            assert resp.status == 200, resp.body
            assert resp.json()["target"] == target
            assert resp.json()["body_sha256"] == sha256(body)
    recorded = _recorded(pods, "/in-pieces/0") + _recorded(pods, "/in-pieces/1")
    assert [r.group for r in recorded] == [pods.recipe.owner("pieces-0"), pods.recipe.owner("pieces-1")]
    assert all(r.header("X-Trace-Me") == "yes" and r.body_length == 3000 for r in recorded)


def test_chunked_request_body_arrives_intact(gw: Gateway, pods: LiveGroups) -> None:
    pieces = [b"a", os.urandom(10), os.urandom(4096), os.urandom(70_000), b"xyz", os.urandom(1)]
    body = b"".join(pieces)
    with RawConn(gw.port) as conn:
        conn.send(
            build_request("POST", "/chunked-in", [(KEY_HEADER, "chunky"), ("Transfer-Encoding", "chunked")])
            + chunked_body(pieces)
        )
        resp = conn.read_response("POST")
        assert resp.status == 200, resp.body[:300]
        assert resp.json()["body_sha256"] == sha256(body)
        # A chunk extension is legal and must not disturb the framing either.
        conn.send(
            build_request("PUT", "/chunked-in", [(KEY_HEADER, "chunky"), ("Transfer-Encoding", "chunked")])
            + b"5;name=value\r\nhello\r\n0\r\n\r\n"
        )
        resp = conn.read_response("PUT")
        assert resp.status == 200
        assert resp.json()["body_sha256"] == sha256(b"hello")
    recorded = sorted(_recorded(pods, "/chunked-in"), key=lambda r: r.received_at)
    assert [r.body for r in recorded] == [body, b"hello"]


def test_chunked_request_with_trailer_keeps_the_connection_in_sync(gw: Gateway, pods: LiveGroups) -> None:
    with RawConn(gw.port) as conn:
        conn.send(
            build_request("POST", "/trailer", [(KEY_HEADER, "trailer"), ("Transfer-Encoding", "chunked")])
            + b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Checksum: 42\r\n\r\n"
            + build_request("GET", "/after-trailer")
        )
        first = conn.read_response("POST")
        assert first.status == 200, first.body[:300]
        assert first.json()["body_sha256"] == sha256(b"wikipedia")
        second = conn.read_response()
        assert second.status == 200
        assert second.json()["target"] == "/after-trailer"


def test_chunked_response_is_relayed(gw: Gateway) -> None:
    with RawConn(gw.port) as conn:
        conn.send(build_request("GET", "/chunked?chunks=20&size=3000"))
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == pattern(60_000)
        assert resp.header("X-Shard-Group") in ("frame-1", "frame-2")
        conn.send(build_request("GET", "/after-chunked"))
        assert conn.read_response().json()["target"] == "/after-chunked"
    # http.client's own parser agrees.
    result = http_request(gw.port, "GET", "/chunked?chunks=3&size=5")
    assert result.status == 200 and result.body == pattern(15)


def test_head_has_no_body_and_keeps_the_connection_usable(gw: Gateway) -> None:
    with RawConn(gw.port) as conn:
        conn.send(build_request("HEAD", "/head"))
        head = conn.read_response("HEAD")
        assert head.status == 200
        if head.header("Content-Length") is not None:
            assert int(head.header("Content-Length") or 0) == len(HEAD_BODY)
        # The upstream announces 1 MB and (correctly) sends none of it.
        conn.send(build_request("HEAD", "/big?size=1000000"))
        head = conn.read_response("HEAD")
        assert head.status == 200
        conn.send(build_request("GET", "/head"))
        get = conn.read_response("GET")
        assert get.status == 200
        assert get.body == HEAD_BODY
        # Nothing stray arrived: the next response starts right where it should.
        conn.send(build_request("GET", "/after-head"))
        assert conn.read_response().json()["target"] == "/after-head"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(gw: Gateway, status: int) -> None:
    with RawConn(gw.port) as conn:
        for _ in range(3):
            conn.send(build_request("GET", f"/status/{status}"))
            resp = conn.read_response()
            assert resp.status == status
            assert resp.body == b""
            assert "chunked" not in ",".join(resp.header_all("Transfer-Encoding")).lower()
            if status == 204:
                assert resp.header("Content-Length") in (None, "0")
        conn.send(build_request("GET", "/after-nobody"))
        assert conn.read_response().json()["target"] == "/after-nobody"


def test_expect_100_continue(gw: Gateway, pods: LiveGroups) -> None:
    body = os.urandom(50_000)
    with RawConn(gw.port) as conn:
        conn.send(
            build_request(
                "POST",
                "/continue",
                [(KEY_HEADER, "expect"), ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
            )
        )
        interim = conn.read_head()  # the client waits for 100 before sending the body
        assert interim.status == 100, interim
        conn.send(body)
        final = conn.read_response("POST")
        assert final.status == 200
        assert final.json()["body_sha256"] == sha256(body)
        assert final.header("X-Shard-Group") == pods.recipe.owner("expect")
        conn.send(build_request("GET", "/after-continue"))
        assert conn.read_response().json()["target"] == "/after-continue"
    (req,) = _recorded(pods, "/continue")
    assert req.body == body


def test_expect_100_continue_refused_without_the_body(gw: Gateway, pods: LiveGroups) -> None:
    # A write without a key is refused from the headers alone: no 100, the final error at once.
    with RawConn(gw.port) as conn:
        conn.send(
            build_request(
                "POST", "/continue-refused", [("Expect", "100-continue"), ("Content-Length", "100000")]
            )
        )
        resp = conn.read_response("POST")
        assert resp.status == 400
        assert 100 not in resp.informational
        assert resp.json()["error"] == "missing_shard_key"
    assert not _recorded(pods, "/continue-refused")


def test_pipelined_requests_answered_in_order(gw: Gateway) -> None:
    requests = [
        build_request("GET", "/p/1", [("X-Request-ID", "pipe-1")]),
        build_request("POST", "/p/2", [("X-Request-ID", "pipe-2"), (KEY_HEADER, "pipe")], b"posted body"),
        build_request("GET", "/chunked?chunks=3&size=10", [("X-Request-ID", "pipe-3")]),
        build_request("HEAD", "/p/4", [("X-Request-ID", "pipe-4")]),
        build_request("GET", "/status/204", [("X-Request-ID", "pipe-5")]),
        build_request("GET", "/p/6", [("X-Request-ID", "pipe-6")]),
    ]
    methods = ["GET", "POST", "GET", "HEAD", "GET", "GET"]
    with RawConn(gw.port) as conn:
        conn.send(b"".join(requests))  # one write
        responses = [conn.read_response(m) for m in methods]
    assert [r.header("X-Request-ID") for r in responses] == [f"pipe-{i}" for i in range(1, 7)]
    assert [r.status for r in responses] == [200, 200, 200, 200, 204, 200]
    assert responses[0].json()["target"] == "/p/1"
    assert responses[1].json()["body_sha256"] == sha256(b"posted body")
    assert responses[2].body == pattern(30)
    assert responses[3].body == b""
    assert responses[5].json()["target"] == "/p/6"


def test_request_fields_go_upstream_as_they_came(gw: Gateway, pods: LiveGroups) -> None:
    # The gateway forwards a head that arrived whole by slicing its field lines out of the
    # read, and rebuilds the others (a second pipelined head, a head after the CRLF llhttp
    # skips): every way must forward the same fields, in order, with the gateway's own after.
    fields = [
        (b"x-MiXeD-Case", b"Value With  Spaces"),
        (b"X-Tight", b"no-space-after-colon"),
        (b"X-Tabs", b"tabbed"),
        (KEY_HEADER.encode(), b"fields"),
        (b"Content-Length", b"2"),
    ]
    raw_fields = b"x-MiXeD-Case: Value With  Spaces\r\nX-Tight:no-space-after-colon\r\nX-Tabs:\ttabbed\t\r\n"
    raw_fields += KEY_HEADER.encode() + b": fields\r\nContent-Length: 2\r\n"

    def request(n: int) -> bytes:
        return b"POST /fields/%d HTTP/1.1\r\nHost: fields.example\r\n%s\r\n{}" % (n, raw_fields)

    with RawConn(gw.port) as conn:
        conn.send(request(1))  # whole, at the start of a read
        assert conn.read_response("POST").status == 200
        conn.send(request(2) + request(3))  # the second head starts mid-read
        assert [conn.read_response("POST").status for _ in range(2)] == [200, 200]
        conn.send(b"\r\n" + request(4))  # llhttp skips the CRLF before a request line
        assert conn.read_response("POST").status == 200

    expected = [("Host", "fields.example")] + [(n.decode(), v.decode()) for n, v in fields]
    for n in range(1, 5):
        (req,) = _recorded(pods, f"/fields/{n}")
        assert req.headers[: len(expected)] == expected, (n, req.headers)
        gateway_fields = [name for name, _ in req.headers[len(expected) :]]
        assert gateway_fields[0] == "X-Request-ID", (n, req.headers)
        assert {"X-Forwarded-For", "Via", "X-Shard-Epoch", "X-Shard-Group"} <= set(gateway_fields)
        assert req.body == b"{}"


def test_pipelined_refusal_keeps_the_order(gw: Gateway, pods: LiveGroups) -> None:
    requests = [
        build_request("GET", "/pr/1", [("X-Request-ID", "pr-1")]),
        build_request("POST", "/pr/2", [("X-Request-ID", "pr-2")], b"no key, refused"),
        build_request("GET", "/pr/3", [("X-Request-ID", "pr-3")]),
    ] + [build_request("GET", f"/pr/many/{i}", [("X-Request-ID", f"prm-{i}")]) for i in range(50)]
    with RawConn(gw.port) as conn:
        conn.send(b"".join(requests))
        responses = [conn.read_response("POST" if i == 1 else "GET") for i in range(len(requests))]
    assert [r.status for r in responses[:3]] == [200, 400, 200]
    assert responses[1].json()["error"] == "missing_shard_key"
    assert [r.header("X-Request-ID") for r in responses] == (
        ["pr-1", "pr-2", "pr-3"] + [f"prm-{i}" for i in range(50)]
    )
    assert [r.json()["target"] for r in responses[3:]] == [f"/pr/many/{i}" for i in range(50)]
    assert not _recorded(pods, "/pr/2")


def test_http10_client_gets_no_chunked_encoding(gw: Gateway) -> None:
    with RawConn(gw.port) as conn:
        conn.send(b"GET /chunked?chunks=5&size=100 HTTP/1.0\r\nHost: old.example\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert "chunked" not in ",".join(resp.header_all("Transfer-Encoding")).lower(), resp.headers
        assert resp.body == pattern(500)
        closed, _ = conn.wait_closed(5.0)
        assert closed, "an HTTP/1.0 request without keep-alive must end with the connection"
    with RawConn(gw.port) as conn:
        conn.send(b"GET /old HTTP/1.0\r\nHost: old.example\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200 and resp.json()["target"] == "/old"
        assert conn.wait_closed(5.0)[0]


def test_upstream_answering_before_the_body_is_relayed(gw: Gateway, pods: LiveGroups) -> None:
    size = 4 * MB
    with RawConn(gw.port, timeout=20) as conn:
        conn.send(build_request("POST", "/early", [(KEY_HEADER, "early"), ("Content-Length", str(size))]))
        stop = threading.Event()

        def sender() -> None:
            with contextlib.suppress(OSError):
                for start in range(0, size, 64 * 1024):
                    if stop.is_set():
                        return
                    conn.sock.sendall(pattern(size)[start : start + 64 * 1024])

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            resp = conn.read_response("POST")
        finally:
            stop.set()
            thread.join(10)
    assert resp.status == 403, resp.body[:200]
    assert resp.header("X-Shard-Group") == pods.recipe.owner("early")
    assert resp.json() == {"error": "rejected early"}
    assert len(_recorded(pods, "/early")) == 1


def test_pooled_connection_closed_by_the_upstream_is_not_reused(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    pod = upstreams.one("idle", "idle-pod", idle_close=0.2)
    gw = start_gateway([group_of("idle", [pod])])

    def pooled_idle() -> int:
        (group,) = gw.debug_ring()["groups"]
        return sum(int(p.get("idle_connections", 0)) for p in group["pods"])

    for i in range(4):
        closed = pod.idle_closed
        result = http_request(gw.port, "POST", "/idle-reuse", {KEY_HEADER: f"idle-{i}"}, b"{}")
        assert result.status == 200, (i, result.status, result.body[:200])
        # The upstream closes the now-idle pooled connection; the gateway must notice.
        assert wait_until(lambda: pod.idle_closed > closed, 5.0)  # noqa: B023 (called right here)
        assert wait_until(lambda: pooled_idle() == 0, 5.0), "a closed upstream connection stayed pooled"
    recorded = [r for r in pod.requests() if r.path == "/idle-reuse"]
    assert len(recorded) == 4
    assert len({r.conn_id for r in recorded}) == 4


def test_client_connection_close_is_honoured(gw: Gateway) -> None:
    with RawConn(gw.port) as conn:
        conn.send(build_request("GET", "/bye", [("Connection", "close")]))
        resp = conn.read_response()
        assert resp.status == 200
        closed, extra = conn.wait_closed(5.0)
        assert closed, "gateway kept the connection open after Connection: close"
        assert extra == b""


def test_upstream_connection_close_and_eof_framing(gw: Gateway) -> None:
    targets = ["/close", "/close?framing=eof", "/plain"] * 10
    conn = RawConn(gw.port)
    try:
        for i, target in enumerate(targets):
            if conn.eof:
                conn.close()
                conn = RawConn(gw.port)
            conn.send(build_request("GET", target, [("X-Request-ID", f"close-{i}")]))
            resp = conn.read_response()
            assert resp.status == 200, (target, resp.status, resp.body[:200])
            echo = resp.json()  # a complete body, however the gateway framed it
            assert echo["target"] == target
            assert resp.header("X-Request-ID") == f"close-{i}"
            framed = resp.header("Content-Length") is not None or resp.chunked
            assert framed or conn.eof, "an unframed response must end with the connection"
    finally:
        conn.close()


def test_keepalive_reuses_upstream_connections(gw: Gateway, pods: LiveGroups) -> None:
    with RawConn(gw.port) as conn:
        for i in range(300):
            if i % 2:
                conn.send(build_request("GET", "/reuse"))
                method = "GET"
            else:
                conn.send(build_request("POST", "/reuse", [(KEY_HEADER, f"reuse-{i}")], b"{}"))
                method = "POST"
            resp = conn.read_response(method)
            assert resp.status == 200
            assert not conn.eof, "the gateway closed a keep-alive client connection"
    recorded = _recorded(pods, "/reuse")
    assert len(recorded) == 300
    upstream_conns = {r.conn_id for r in recorded}
    # Sequential requests need one pooled connection per pod; allow one spare each.
    assert len(upstream_conns) <= 2 * len(pods.servers), sorted(upstream_conns)


def _measure_peak_growth(gw: Gateway) -> tuple[int, bool]:
    """Reset VmHWM to the current RSS (when the kernel lets us) and return the baseline."""
    reset = gw.reset_peak_rss()
    baseline = gw.rss() if reset else gw.peak_rss()
    return baseline, reset


def test_big_upload_to_a_slow_upstream_streams_with_bounded_memory(gw: Gateway, pods: LiveGroups) -> None:
    key = "uploader"
    owner = pods.recipe.owner(key)

    def upload(size: int, tag: str) -> dict[str, Any]:
        body = pattern(size)
        with RawConn(gw.port, timeout=60) as conn:
            conn.send(
                build_request(
                    "POST", f"/upload?slow=1&tag={tag}", [(KEY_HEADER, key), ("Content-Length", str(size))]
                )
            )
            view = memoryview(body)
            for start in range(0, size, 256 * 1024):
                conn.send(view[start : start + 256 * 1024].tobytes())
            resp = conn.read_response("POST")
        assert resp.status == 200, resp.body[:300]
        echo = resp.json()
        assert echo["group"] == owner
        assert echo["body_length"] == size
        assert echo["body_sha256"] == sha256(body)
        return echo

    upload(1 * MB, "warmup")  # pools, buffers and code paths exist before the measurement
    baseline, _ = _measure_peak_growth(gw)
    started = time.monotonic()
    upload(BIG, "big")
    elapsed = time.monotonic() - started
    growth = gw.peak_rss() - baseline
    assert growth < MAX_PEAK_GROWTH, (
        f"peak RSS grew by {growth / MB:.1f} MiB while a 10 MiB upload streamed to a slow upstream"
        f" ({elapsed:.1f}s): the body is being buffered"
    )


def test_big_download_to_a_slow_client_streams_with_bounded_memory(gw: Gateway) -> None:
    def download(size: int, slow: bool) -> None:
        with RawConn(gw.port, timeout=60, rcvbuf=16 * 1024) as conn:
            conn.send(build_request("GET", f"/big?size={size}"))
            resp = conn.read_head()
            assert resp.status == 200
            assert int(resp.header("Content-Length") or -1) == size or resp.header("Transfer-Encoding")
            hasher = hashlib.sha256()
            received = len(conn.buf)
            hasher.update(conn.buf)
            conn.buf.clear()
            reads = 0
            while received < size:
                data = conn.sock.recv(16 * 1024)
                assert data, f"connection closed after {received} of {size} bytes"
                hasher.update(data)
                received += len(data)
                reads += 1
                if slow and reads % 4 == 0:
                    time.sleep(0.002)  # a slow reader (pacing, not synchronisation)
            assert received == size
            assert hasher.hexdigest() == sha256(pattern(size))

    download(1 * MB, slow=False)
    baseline, _ = _measure_peak_growth(gw)
    download(BIG, slow=True)
    growth = gw.peak_rss() - baseline
    assert growth < MAX_PEAK_GROWTH, (
        f"peak RSS grew by {growth / MB:.1f} MiB while a slow client read a 10 MiB response"
    )
