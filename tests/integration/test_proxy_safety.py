"""Foundation safety checks through the real gateway process: a write is never sent twice,
Host is required as RFC 9112 says, and /debug/route decides exactly as the data plane does."""

from __future__ import annotations

import json
from urllib.parse import quote_from_bytes

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
from tests.integration.upstream import RawConn, build_request
from tests.support import contract_ring

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def live(module_upstreams: UpstreamFactory) -> LiveGroups:
    a, b = module_upstreams("safe-1", 2), module_upstreams("safe-2", 2)
    return LiveGroups(a + b, [group_of("safe-1", a), group_of("safe-2", b)])


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, live: LiveGroups) -> Gateway:
    return module_gateway(live.groups, reads="owner", health=NO_EJECTION)


# -- a write is never sent twice (invariant 4) --------------------------------------------------


def test_a_get_made_a_write_is_not_resent_when_its_connection_drops(gw: Gateway, live: LiveGroups) -> None:
    """``GET`` + ``Operation-Type: write`` is a write: after it reached a pod it is never sent
    to another, even though GET alone would be retried there."""
    for i in range(6):
        target = f"/reset?write={i}"
        headers = {KEY_HEADER: f"op-write-{i}", "Operation-Type": "write"}
        result = http_request(gw.port, "GET", target, headers)
        assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
        seen = all_requests(live.servers, lambda r, t=target: r.target == t)
        assert len(seen) == 1, f"a write that reached a pod was sent {len(seen)} times"


def test_a_plain_get_is_tried_once_more_when_its_connection_drops(gw: Gateway, live: LiveGroups) -> None:
    """The contrast: a bodiless idempotent read may go again, once (so the test above can fail)."""
    result = http_request(gw.port, "GET", "/reset?read=1", {KEY_HEADER: "plain-read"})
    assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
    assert len(all_requests(live.servers, lambda r: r.target == "/reset?read=1")) == 2


# -- Host (RFC 9112 3.2) --------------------------------------------------------------------------


def _raw(gw: Gateway, data: bytes) -> tuple[int, bytes, bool]:
    with RawConn(gw.port) as conn:
        conn.send(data)
        resp = conn.read_response("GET")
        closed, _ = conn.wait_closed(5.0)
        return resp.status, resp.body, closed


@pytest.mark.parametrize(
    "head",
    [
        b"GET /h HTTP/1.1\r\nUser-ID: host-1\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nUser-ID: host-2\r\n\r\n",
        b"GET /h HTTP/1.0\r\nHost: a.test\r\nHost: a.test\r\nUser-ID: host-3\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost: a b\r\nUser-ID: host-4\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost: a.test/x\r\nUser-ID: host-5\r\n\r\n",
    ],
    ids=["missing", "two", "two-http10", "space", "slash"],
)
def test_a_request_without_exactly_one_valid_host_gets_400(
    gw: Gateway, live: LiveGroups, head: bytes
) -> None:
    status, body, closed = _raw(gw, head)
    assert status == 400 and json.loads(body)["error"] == "bad_request", body
    assert closed
    assert not all_requests(live.servers, lambda r: r.path == "/h"), "a bad request was forwarded"
    assert_serves(gw)


@pytest.mark.parametrize(
    "host", [b"a.test", b"a.test:8080", b"[2001:db8::1]:80", b"192.0.2.1", b"xn--bcher-kva.example"]
)
def test_valid_hosts_are_served(gw: Gateway, live: LiveGroups, host: bytes) -> None:
    with RawConn(gw.port) as conn:
        conn.send(b"GET /valid-host HTTP/1.1\r\nHost: %s\r\nUser-ID: vh\r\n\r\n" % host)
        assert conn.read_response("GET").status == 200


def test_an_http10_request_may_omit_host(gw: Gateway, live: LiveGroups) -> None:
    with RawConn(gw.port) as conn:
        conn.send(b"GET /http10 HTTP/1.0\r\nUser-ID: h10\r\n\r\n")
        assert conn.read_response("GET").status == 200


# -- /debug/route decides as the data plane does ---------------------------------------------------


def _disagreeing(live: LiveGroups, decorate: str) -> bytes:
    """A key whose owner changes when ``decorate``'s Unicode spaces are wrongly stripped."""
    ring = contract_ring({g.name: g.weight for g in live.groups})
    for i in range(1000):
        key = f"user-{i}"
        if ring.get_node(decorate.format(key)) != ring.get_node(key):
            return decorate.format(key).encode()
    raise AssertionError("no such key")


# (key, what the data plane answers: 200, or the error code of its 400)
FIXED_KEYS = [
    (b"alice", 200),
    (b" \talice \t", 200),  # spaces and tabs around the key are not part of it
    ("\u00fcn\u00efc\u00f6d\u00e9".encode(), 200),
    ("a\u0085b".encode(), "invalid_shard_key"),  # C1 control (NEXT LINE)
    ("a\u009fb".encode(), "invalid_shard_key"),  # C1 control
    (b"\xff\xfe", "invalid_shard_key"),  # not UTF-8
    (b"k" * 257, "invalid_shard_key"),  # too long
    (b"k" * 256, 200),
]
UNICODE_SPACES = ["\u00a0{}", "{}\u2003", "\u3000{}\u00a0"]  # part of the key: only SP/HTAB go


def _route(gw: Gateway, raw: bytes) -> tuple[int, dict[str, object]]:
    status, _, body = gw.admin_get("/debug/route?key=" + quote_from_bytes(raw, safe=""))
    return status, json.loads(body)


def _assert_route_agrees(gw: Gateway, raw: bytes, expected: int | str) -> None:
    route_status, route = _route(gw, raw)
    with RawConn(gw.port) as conn:
        conn.send(build_request("POST", "/route-check", [(KEY_HEADER, raw)], b"{}"))
        resp = conn.read_response("POST")
    if expected == 200:
        assert resp.status == 200, resp.body
        assert route_status == 200, route
        assert route["group"] == resp.header("X-Shard-Group")
    else:
        assert resp.status == 400 and json.loads(resp.body)["error"] == expected, resp.body
        assert route_status == 400 and route["error"] == expected, route


@pytest.mark.parametrize(("raw", "expected"), FIXED_KEYS, ids=lambda k: repr(k)[:16])
def test_debug_route_decides_as_the_data_plane(gw: Gateway, raw: bytes, expected: int | str) -> None:
    _assert_route_agrees(gw, raw, expected)


@pytest.mark.parametrize("decorate", UNICODE_SPACES)
def test_debug_route_keeps_unicode_spaces_as_the_data_plane_does(
    gw: Gateway, live: LiveGroups, decorate: str
) -> None:
    _assert_route_agrees(gw, _disagreeing(live, decorate), 200)


def test_debug_route_refuses_control_characters_the_data_plane_refuses(gw: Gateway) -> None:
    """llhttp refuses a header value with a C0 control (bad_request); /debug/route gets the key
    through the query, so it applies the key rule itself: 400 invalid_shard_key, never 200."""
    status, route = _route(gw, b"a\x01b")
    assert status == 400 and route["error"] == "invalid_shard_key", route
    status, route = _route(gw, b"")
    assert status == 400 and route["error"] == "missing_shard_key", route
    status, _, body = gw.admin_get("/debug/route?key=a&key=b")
    assert status == 400 and json.loads(body)["error"] == "invalid_shard_key", body


def test_debug_route_reads_plus_as_a_space_and_percent_2b_as_a_plus(gw: Gateway) -> None:
    spaced, plus = gw.admin_get("/debug/route?key=a+b"), gw.admin_get("/debug/route?key=a%2Bb")
    assert json.loads(spaced[2])["key"] == "a b" and json.loads(plus[2])["key"] == "a+b"
    _assert_route_agrees(gw, b"a b", 200)
    _assert_route_agrees(gw, b"a+b", 200)
