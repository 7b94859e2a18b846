"""Routing through the real gateway: the ring recipe, strict write ownership, read policies, headers."""

from __future__ import annotations

import http.client
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    UpstreamFactory,
    all_requests,
    assert_json_error,
    group_of,
    http_request,
    unicode_padded_keys,
)
from tests.integration.upstream import RawConn, UpstreamServer, build_request
from tests.support import contract_ring

pytestmark = pytest.mark.timeout(90)

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class Cluster:
    def __init__(self, groups: list[GroupSpec], servers: list[UpstreamServer]) -> None:
        self.groups = groups
        self.servers = servers
        self.recipe = Recipe(groups)
        self.pods_of = {g.name: [s for s in servers if s.group == g.name] for g in groups}


@pytest.fixture(scope="module")
def cluster(module_upstreams: UpstreamFactory) -> Cluster:
    servers: list[UpstreamServer] = []
    groups = []
    for name in ("group-1", "group-2", "group-3"):
        pods = module_upstreams(name, 2)
        servers += pods
        groups.append(group_of(name, pods))
    return Cluster(groups, servers)


@pytest.fixture(scope="module")
def gw_any(module_gateway: GatewayFactory, cluster: Cluster) -> Gateway:
    return module_gateway(cluster.groups, reads="any")


@pytest.fixture(scope="module")
def dead_cluster(module_upstreams: UpstreamFactory) -> Cluster:
    """Two live groups and one whose endpoints refuse every connection."""
    live1, live2 = module_upstreams("alive-1", 2), module_upstreams("alive-2", 2)
    dead = [module_upstreams.dead_port(), module_upstreams.dead_port()]
    groups = [group_of("alive-1", live1), group_of("alive-2", live2), group_of("dead", dead)]
    return Cluster(groups, live1 + live2)


@pytest.fixture(scope="module")
def gw_dead(module_gateway: GatewayFactory, dead_cluster: Cluster) -> Gateway:
    return module_gateway(dead_cluster.groups, reads="owner-preferred")


def key_bytes(value: str) -> str:
    """A recorded (latin-1 decoded) header value back to the text the client sent as UTF-8."""
    return value.encode("latin-1").decode("utf-8")


def make_key(i: int) -> str | bytes:
    if i % 10 == 3:
        return f"ユーザー-{i}".encode()  # non-ASCII keys travel as UTF-8 bytes
    if i % 10 == 7:
        return f"  user-{i}  "  # surrounding whitespace is not part of the key
    return f"user-{i}"


def key_text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _echo(result: Any) -> dict[str, Any]:
    doc = json.loads(result.body)
    assert isinstance(doc, dict)
    return doc


def _upstream_header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


def test_writes_follow_the_recipe_over_keepalive_connections(gw_any: Gateway, cluster: Cluster) -> None:
    epoch = gw_any.epoch()
    total, workers = 2000, 4

    def worker(w: int) -> list[tuple[int, str | bytes, int, str | None, dict[str, Any] | None]]:
        out = []
        conn = http.client.HTTPConnection("127.0.0.1", gw_any.port, timeout=15)
        try:
            for i in range(w, total, workers):
                key = make_key(i)
                method = WRITE_METHODS[i % len(WRITE_METHODS)]
                result = http_request(conn, method, f"/route/{i}", {KEY_HEADER: key}, b'{"n": %d}' % i)
                echo = _echo(result) if result.status == 200 else None
                out.append((i, key, result.status, result.header("X-Shard-Group"), echo))
        finally:
            conn.close()
        return out

    with ThreadPoolExecutor(workers) as pool:
        rows = [row for part in pool.map(worker, range(workers)) for row in part]

    assert len(rows) == total
    owners: Counter[str] = Counter()
    for i, key, status, resp_group, echo in rows:
        owner = cluster.recipe.owner(key_text(key))
        owners[owner] += 1
        assert status == 200, (i, key, status)
        assert echo is not None
        assert echo["group"] == owner, f"write for {key!r} reached {echo['pod']}, owner is {owner}"
        assert resp_group == owner, (key, resp_group, owner)
        assert _upstream_header(echo, "X-Shard-Group") == [owner], (key, echo["headers"])
        assert _upstream_header(echo, "X-Shard-Epoch") == [epoch], (key, echo["headers"])
    assert set(owners) == {g.name for g in cluster.groups}, owners  # the key set covers every group

    # What the pods themselves recorded: every write exactly once, and only at an owner pod.
    recorded = all_requests(cluster.servers, lambda r: r.path.startswith("/route/"))
    assert len(recorded) == total, f"{len(recorded)} writes recorded upstream, {total} sent"
    assert len({r.path for r in recorded}) == total
    for req in recorded:
        key = key_bytes(req.header(KEY_HEADER) or "")
        assert req.group == cluster.recipe.owner(key), (req.pod, key)
    # Keep-alive on both sides: 2000 requests over 4 client connections use few upstream connections.
    conns = {r.conn_id for r in recorded}
    assert len(conns) <= 4 * len(cluster.servers), len(conns)


def test_two_gateways_on_the_same_config_agree(
    gw_any: Gateway, cluster: Cluster, start_gateway: GatewayFactory
) -> None:
    # The same config written differently: comments, other key order, defaults left out.
    groups = "\n".join(
        f"  - endpoints: [{', '.join(repr(e) for e in g.endpoints)}]\n    name: {g.name}"
        for g in cluster.groups
    )
    text = (
        "# the same shard config, spelled differently\n"
        "groups:\n" + groups + "\n"
        "routing: {reads: any, operation_header: Operation-Type, key_header: User-ID}\n"
        "version: 1\n"
    )
    other = start_gateway(text)
    epoch = gw_any.epoch()
    assert other.epoch() == epoch, "equal configs must give equal epochs on every replica"

    for i in range(300):
        key = f"agree-{i}"
        a, b = gw_any.route(key), other.route(key)
        assert a["group"] == b["group"] == cluster.recipe.owner(key), (key, a, b)
        assert a["epoch"] == b["epoch"] == epoch
    conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=15)
    try:
        for i in range(300):
            key = f"agree-{i}"
            result = http_request(conn, "POST", "/agree", {KEY_HEADER: key}, b"x")
            assert result.status == 200
            assert result.header("X-Shard-Group") == cluster.recipe.owner(key)
            assert _upstream_header(_echo(result), "X-Shard-Epoch") == [epoch]
    finally:
        conn.close()


def test_reads_any_spread_over_every_pod_of_every_group(gw_any: Gateway, cluster: Cluster) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw_any.port, timeout=15)
    served: Counter[str] = Counter()
    off_owner = 0
    try:
        for i in range(600):
            headers = {KEY_HEADER: f"reader-{i}"} if i % 2 else {}
            result = http_request(conn, "GET", f"/read/{i}", headers)
            assert result.status == 200, result.body[:200]
            echo = _echo(result)
            served[echo["pod"]] += 1
            # For reads X-Shard-Group names the chosen pod's group, up and back.
            assert result.header("X-Shard-Group") == echo["group"]
            assert _upstream_header(echo, "X-Shard-Group") == [echo["group"]]
            if i % 2 and echo["group"] != cluster.recipe.owner(f"reader-{i}"):
                off_owner += 1
    finally:
        conn.close()
    assert set(served) == {s.pod for s in cluster.servers}, served
    assert off_owner > 0, "reads: any should not be pinned to the owner group"


def test_reads_owner_go_to_the_owner_group(module_gateway: GatewayFactory, cluster: Cluster) -> None:
    gw = module_gateway(cluster.groups, reads="owner")
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    try:
        pods: set[str] = set()
        for i in range(300):
            key = f"owner-read-{i}"
            result = http_request(conn, "GET", "/owner-read", {KEY_HEADER: key})
            assert result.status == 200
            echo = _echo(result)
            owner = cluster.recipe.owner(key)
            assert echo["group"] == owner, (key, echo["pod"], owner)
            assert result.header("X-Shard-Group") == owner
            pods.add(echo["pod"])
        assert len(pods) == len(cluster.servers)  # both pods of each group share the reads
        # A read without a key has no owner: any pod may answer it.
        result = http_request(conn, "GET", "/owner-read-nokey")
        assert result.status == 200
    finally:
        conn.close()


def test_operation_header_turns_a_read_into_a_write(gw_any: Gateway, cluster: Cluster) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw_any.port, timeout=15)
    try:
        for i in range(150):
            key = f"op-{i}"
            result = http_request(conn, "GET", "/op", {KEY_HEADER: key, "Operation-Type": "write"})
            assert result.status == 200
            owner = cluster.recipe.owner(key)
            assert _echo(result)["group"] == owner, f"GET+Operation-Type: write for {key} left {owner}"
            assert result.header("X-Shard-Group") == owner
    finally:
        conn.close()
    before = len(all_requests(cluster.servers, lambda r: r.path == "/op-nokey"))
    # As a write, it needs a key ...
    result = http_request(gw_any.port, "GET", "/op-nokey", {"Operation-Type": "write"})
    assert_json_error(result.status, result.headers, result.body, 400, "missing_shard_key")
    # ... and a client can never turn a write into a read.
    result = http_request(gw_any.port, "POST", "/op-nokey", {"Operation-Type": "read"}, b"{}")
    assert_json_error(result.status, result.headers, result.body, 400, "missing_shard_key")
    assert len(all_requests(cluster.servers, lambda r: r.path == "/op-nokey")) == before


@pytest.mark.parametrize("method", WRITE_METHODS)
def test_write_without_key_is_refused(gw_any: Gateway, cluster: Cluster, method: str) -> None:
    result = http_request(gw_any.port, method, f"/nokey/{method}", {}, b"{}")
    doc = assert_json_error(result.status, result.headers, result.body, 400, "missing_shard_key")
    assert "json" in (result.header("Content-Type") or ""), result.headers
    # A client-supplied request id is echoed in the error too.
    result = http_request(gw_any.port, method, f"/nokey/{method}", {"X-Request-ID": "rid-nokey-1"}, b"{}")
    doc = assert_json_error(result.status, result.headers, result.body, 400, "missing_shard_key")
    assert doc["request_id"] == "rid-nokey-1"
    # A whitespace-only key is no key.
    result = http_request(gw_any.port, method, f"/nokey/{method}", {KEY_HEADER: "   "}, b"{}")
    assert_json_error(
        result.status, result.headers, result.body, 400, {"missing_shard_key", "invalid_shard_key"}
    )
    assert not all_requests(cluster.servers, lambda r: r.path == f"/nokey/{method}")


def _raw_post(gw: Gateway, path: str, key: bytes) -> Any:
    with RawConn(gw.port) as conn:
        conn.send(build_request("POST", path, [(KEY_HEADER, key)], b"{}"))
        return conn.read_response("POST")


def test_invalid_keys_are_refused(gw_any: Gateway, cluster: Cluster) -> None:
    # 256 bytes is the limit and is accepted; one more byte is not.
    ok = "k" * 256
    result = http_request(gw_any.port, "POST", "/badkey-ok", {KEY_HEADER: ok}, b"{}")
    assert result.status == 200
    assert _echo(result)["group"] == cluster.recipe.owner(ok)

    for key in ("k" * 257, "k" * 300):
        result = http_request(gw_any.port, "POST", "/badkey", {KEY_HEADER: key}, b"{}")
        assert_json_error(result.status, result.headers, result.body, 400, "invalid_shard_key")
    # A control character that is still valid HTTP (HTAB inside the value).
    resp = _raw_post(gw_any, "/badkey", b"ab\tcd")
    assert_json_error(resp.status, resp.headers, resp.body, 400, "invalid_shard_key")
    # Invalid UTF-8 (obs-text bytes are valid HTTP, but not a valid key).
    for raw in (b"\xff\xfe", b"user-\xc3\x28", b"\xe3\x81"):
        resp = _raw_post(gw_any, "/badkey", raw)
        assert_json_error(resp.status, resp.headers, resp.body, 400, "invalid_shard_key")
    # Other control characters are already invalid HTTP field values (RFC 9110 5.5); either
    # error code is a clear 400, and neither may reach an upstream.
    for raw in (b"ab\x01cd", b"ab\x7fcd", b"ab\x00cd"):
        resp = _raw_post(gw_any, "/badkey", raw)
        assert_json_error(resp.status, resp.headers, resp.body, 400, {"invalid_shard_key", "bad_request"})
    assert not all_requests(cluster.servers, lambda r: r.path == "/badkey")


def test_a_repeated_key_header_is_refused(gw_any: Gateway, cluster: Cluster) -> None:
    # Two keys in one request: the gateway would route by one while a backend may read the
    # other and write a key its group does not own. Neither a write nor a read goes through.
    for method in ("POST", "GET"):
        with RawConn(gw_any.port) as conn:
            conn.send(build_request(method, "/twokeys", [(KEY_HEADER, "alice"), (KEY_HEADER, "bob")], b"{}"))
            resp = conn.read_response(method)
        assert_json_error(resp.status, resp.headers, resp.body, 400, "invalid_shard_key")
    assert not all_requests(cluster.servers, lambda r: r.path == "/twokeys")


def test_client_shard_headers_are_replaced(gw_any: Gateway, cluster: Cluster) -> None:
    epoch = gw_any.epoch()
    for i in range(20):
        key = f"spoof-{i}"
        owner = cluster.recipe.owner(key)
        wrong = next(g.name for g in cluster.groups if g.name != owner)
        headers = [
            (KEY_HEADER, key),
            ("X-Shard-Group", wrong),
            ("X-Shard-Epoch", "0000000000000000"),
            ("x-shard-group", wrong),
            ("X-Shard-Anything", "client-made"),
        ]
        result = http_request(gw_any.port, "POST", "/spoof", headers, b"{}")
        assert result.status == 200
        echo = _echo(result)
        assert echo["group"] == owner
        assert _upstream_header(echo, "X-Shard-Group") == [owner]
        assert _upstream_header(echo, "X-Shard-Epoch") == [epoch]
        assert not _upstream_header(echo, "X-Shard-Anything")
        assert result.header_all("X-Shard-Group") == [owner]


def test_request_id_kept_or_generated(gw_any: Gateway) -> None:
    result = http_request(
        gw_any.port, "POST", "/rid", {KEY_HEADER: "rid", "X-Request-ID": "client-id-42"}, b""
    )
    assert result.status == 200
    assert _upstream_header(_echo(result), "X-Request-ID") == ["client-id-42"]
    assert result.header("X-Request-ID") == "client-id-42"

    seen = set()
    conn = http.client.HTTPConnection("127.0.0.1", gw_any.port, timeout=15)
    try:
        for i in range(100):
            method, headers = ("GET", {}) if i % 2 else ("POST", {KEY_HEADER: f"rid-{i}"})
            result = http_request(conn, method, "/rid", headers, b"" if method == "POST" else None)
            assert result.status == 200
            upstream_ids = _upstream_header(_echo(result), "X-Request-ID")
            assert len(upstream_ids) == 1 and upstream_ids[0], upstream_ids
            assert result.header("X-Request-ID") == upstream_ids[0]
            seen.add(upstream_ids[0])
    finally:
        conn.close()
    assert len(seen) == 100, "generated request ids must be unique"


def test_forwarded_headers_and_via(gw_any: Gateway) -> None:
    with RawConn(gw_any.port) as conn:
        conn.send(build_request("POST", "/fwd", [(KEY_HEADER, "fwd")], b"{}", host="shop.example:8443"))
        resp = conn.read_response("POST")
        assert resp.status == 200
        echo = resp.json()
        conn.send(
            build_request(
                "POST",
                "/fwd",
                [(KEY_HEADER, "fwd"), ("X-Forwarded-For", "203.0.113.9")],
                b"{}",
                host="shop.example",
            )
        )
        resp2 = conn.read_response("POST")
        assert resp2.status == 200
        echo2 = resp2.json()

    # The gateway's own hop: the peer address it saw, and its Via entry.
    assert _upstream_header(echo, "X-Forwarded-For") == ["127.0.0.1"], echo["headers"]
    assert _upstream_header(echo, "X-Forwarded-Proto") == ["http"]
    assert _upstream_header(echo, "X-Forwarded-Host") == ["shop.example:8443"]
    assert _upstream_header(echo, "Via") == ["1.1 shardgate"], echo["headers"]
    # A client's value is kept, with the gateway's hop appended last.
    assert _upstream_header(echo2, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"], echo2["headers"]
    assert _upstream_header(echo2, "X-Forwarded-Host") == ["shop.example"]


@pytest.mark.parametrize(
    ("fields", "want_xff", "want_via"),
    [
        ([("X-Forwarded-For", "203.0.113.9, 198.51.100.7")], "203.0.113.9, 198.51.100.7, 127.0.0.1", None),
        (
            [("X-Forwarded-For", "203.0.113.9"), ("x-forwarded-for", "198.51.100.7, 192.0.2.1")],
            "203.0.113.9, 198.51.100.7, 192.0.2.1, 127.0.0.1",
            None,
        ),
        ([("Via", "1.0 fred")], None, "1.0 fred, 1.1 shardgate"),
        ([("Via", "1.0 fred, 1.1 p.example.net")], None, "1.0 fred, 1.1 p.example.net, 1.1 shardgate"),
        (
            [("Via", "1.0 fred"), ("X-Forwarded-For", "203.0.113.9"), ("X-Other", "x"), ("VIA", "2 edge")],
            "203.0.113.9, 127.0.0.1",
            "1.0 fred, 2 edge, 1.1 shardgate",
        ),
        (
            [("X-Forwarded-For", "203.0.113.9"), ("Via", "1.1 lb"), ("X-Forwarded-For", "10.0.0.7")],
            "203.0.113.9, 10.0.0.7, 127.0.0.1",
            "1.1 lb, 1.1 shardgate",
        ),
    ],
    ids=["xff-list", "xff-fields", "via", "via-list", "via-fields", "both"],
)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_client_forwarded_for_and_via_are_extended_not_replaced(
    gw_any: Gateway, method: str, fields: list[tuple[str, str]], want_xff: str | None, want_via: str | None
) -> None:
    """X-Forwarded-For and Via keep what the client (or a proxy before the gateway) sent: several
    fields are combined in order into one, and the gateway's hop (``127.0.0.1``, ``1.1
    shardgate``) is appended last."""
    body = b"{}" if method == "POST" else None
    with RawConn(gw_any.port) as conn:
        conn.send(build_request(method, "/fwd-chain", [(KEY_HEADER, "fwd-chain"), *fields], body))
        resp = conn.read_response(method)
    assert resp.status == 200, resp.body[:300]
    echo = resp.json()
    assert _upstream_header(echo, "X-Forwarded-For") == [want_xff or "127.0.0.1"], echo["headers"]
    assert _upstream_header(echo, "Via") == [want_via or "1.1 shardgate"], echo["headers"]
    assert _upstream_header(echo, "X-Forwarded-Proto") == ["http"], echo["headers"]


def test_hop_by_hop_headers_removed_both_ways(gw_any: Gateway, cluster: Cluster) -> None:
    headers: list[tuple[str, str | bytes]] = [
        (KEY_HEADER, "hop"),
        ("Connection", "keep-alive, X-Custom-Hop"),
        ("X-Custom-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("X-End-To-End-Req", "kept"),
    ]
    with RawConn(gw_any.port) as conn:
        conn.send(build_request("POST", "/hop", headers, b"{}"))
        resp = conn.read_response("POST")
        assert resp.status == 200, resp.body[:300]
        # The connection is still good for another request afterwards.
        conn.send(build_request("GET", "/hop-after"))
        assert conn.read_response().status == 200

    recorded = all_requests(cluster.servers, lambda r: r.path == "/hop")
    assert len(recorded) == 1
    req = recorded[0]
    names = req.header_names()
    for gone in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-custom-hop"):
        assert gone not in names, f"{gone} forwarded upstream: {req.headers}"
    for value in req.header_all("Connection"):
        assert "x-custom-hop" not in value.lower(), req.headers
    assert req.header("X-End-To-End-Req") == "kept"

    lower = {k.lower() for k, _ in resp.headers}
    for gone in ("keep-alive", "proxy-connection", "upgrade", "x-hop-resp"):
        assert gone not in lower, f"{gone} forwarded to the client: {resp.headers}"
    for value in resp.header_all("Connection"):
        assert "x-hop-resp" not in value.lower(), resp.headers
    assert resp.header("X-End-To-End") == "kept"


# ---------------------------------------------------------------------------------------------
# Strict ownership with a group that cannot be reached


def test_writes_for_an_unreachable_group_are_never_rerouted(gw_dead: Gateway, dead_cluster: Cluster) -> None:
    recipe = dead_cluster.recipe
    dead_keys = recipe.keys_owned_by("dead", 120, prefix="strict")
    conn = http.client.HTTPConnection("127.0.0.1", gw_dead.port, timeout=15)
    try:
        for i, key in enumerate(dead_keys):
            method = WRITE_METHODS[i % len(WRITE_METHODS)]
            result = http_request(conn, method, f"/strict/{i}", {KEY_HEADER: key}, b"{}")
            if result.status == 503:
                assert_json_error(result.status, result.headers, result.body, 503, "shard_unavailable")
                assert result.header("Retry-After"), result.headers
            else:
                assert_json_error(result.status, result.headers, result.body, 502, "upstream_error")
            # A Connection: close on an error is fine; http.client reconnects.
        # GET + Operation-Type: write is a write too.
        key = dead_keys[0]
        result = http_request(conn, "GET", "/strict/op", {KEY_HEADER: key, "Operation-Type": "write"})
        assert result.status in (502, 503), result.status
    finally:
        conn.close()
    leaked = all_requests(dead_cluster.servers, lambda r: r.path.startswith("/strict/"))
    assert not leaked, f"{len(leaked)} writes for the unreachable group reached {leaked[0].pod}"

    # Writes owned by the live groups are unaffected.
    for group in ("alive-1", "alive-2"):
        for key in recipe.keys_owned_by(group, 30, prefix="strict-live"):
            result = http_request(gw_dead.port, "POST", "/strict-live", {KEY_HEADER: key}, b"{}")
            assert result.status == 200
            assert _echo(result)["group"] == group


def test_owner_preferred_reads_stay_in_an_owner_group_while_it_has_a_usable_pod(
    start_gateway: GatewayFactory, dead_cluster: Cluster
) -> None:
    """``reads: owner-preferred`` sends a read to its owner group while that group has a usable
    pod. With fixed ``endpoints`` a group's pods are always "ready" (there is no health
    information but what requests meet), so the first read for the "dead" group, whose endpoints
    refuse every connection, is tried there, once more on its other pod, and answered 502
    ``upstream_error``; that ejects both pods (passive health), and from then on the group's
    reads go to the other groups' pods. (With discovery, a group without ready pods falls back
    at once: ``tests/k8s/test_gateway_in_cluster.py::
    test_owner_preferred_reads_leave_the_owner_group_only_while_it_has_no_ready_pod``.)
    """
    gw = start_gateway(dead_cluster.groups, reads="owner-preferred")
    recipe = dead_cluster.recipe
    for group in ("alive-1", "alive-2"):
        for key in recipe.keys_owned_by(group, 40, prefix="pref"):
            result = http_request(gw.port, "GET", "/pref", {KEY_HEADER: key})
            assert result.status == 200
            assert _echo(result)["group"] == group, "owner-preferred read left a healthy owner group"
            assert result.header("X-Shard-Group") == group
    dead_keys = recipe.keys_owned_by("dead", 20, prefix="pref-dead")
    first = http_request(gw.port, "GET", "/pref-dead", {KEY_HEADER: dead_keys[0]})
    assert_json_error(first.status, first.headers, first.body, 502, "upstream_error")
    assert not all_requests(dead_cluster.servers, lambda r: r.path == "/pref-dead"), "a read left its owner"
    # A refused connect to one pod of "dead", then one retry on its other pod; both ejected.
    assert gw.metric("shardgate_upstream_connect_failures_total") == 2
    assert gw.metric("shardgate_upstream_retries_total") == 1
    for key in dead_keys[1:]:
        result = http_request(gw.port, "GET", "/pref-dead", {KEY_HEADER: key})
        assert result.status == 200 and _echo(result)["group"] in ("alive-1", "alive-2"), result.status
    assert gw.metric("shardgate_upstream_connect_failures_total") == 2  # none tried again


def test_only_spaces_and_tabs_are_stripped_from_keys(gw_any: Gateway, cluster: Cluster) -> None:
    """The contract strips HTTP's OWS (SP, HTAB) from a key, not other Unicode whitespace: a key
    padded with NBSP, EM SPACE or IDEOGRAPHIC SPACE keeps the padding, and so its own owner
    (chosen here so that a bare ``str.strip()`` would give another group)."""
    recipe = cluster.recipe
    ring = contract_ring({g.name: g.weight for g in cluster.groups})
    for key in unicode_padded_keys(ring):
        for sent in (key, f" \t{key}\t "):  # OWS around it is still stripped
            result = http_request(gw_any.port, "POST", "/ws-key", {KEY_HEADER: sent.encode()}, b"{}")
            assert result.status == 200, (key, result.body[:200])
            assert result.header("X-Shard-Group") == recipe.owner(sent) == str(ring.get_node(key)), key
            assert _echo(result)["group"] == recipe.owner(key) != str(ring.get_node(key.strip())), key


# What a request id may look like (the gateway's own ids too): short, printable, no spaces.
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def _raw_exchange(gw: Gateway, method: str, path: str, fields: list[tuple[str, str | bytes]]) -> Any:
    body = b"{}" if method == "POST" else None
    with RawConn(gw.port) as conn:
        conn.send(build_request(method, path, fields, body))
        return conn.read_response(method)


@pytest.mark.parametrize(
    "value",
    [
        b"r" * 129,
        b"abc def",
        b"id\tinside",
        "req-é-1".encode(),
        b"req-\xff",
        b"",
        b"a;b",
        b'a"b',
        b"a,b",
        b"<script>",
    ],
    ids=[
        "too-long",
        "space",
        "tab",
        "non-ascii-utf8",
        "obs-text",
        "empty",
        "semicolon",
        "quote",
        "comma",
        "angle",
    ],
)
def test_an_invalid_client_request_id_is_replaced_by_a_generated_one(gw_any: Gateway, value: bytes) -> None:
    client_value = value.decode("latin-1")
    seen: set[str] = set()
    for _ in range(2):
        # Proxied: the upstream (its echo says what it received) and the client get the same
        # generated id, not the client's.
        resp = _raw_exchange(
            gw_any, "POST", "/rid-invalid", [(KEY_HEADER, "rid-bad"), ("X-Request-ID", value)]
        )
        assert resp.status == 200, resp.body[:300]
        upstream_ids = _upstream_header(resp.json(), "X-Request-ID")
        assert len(upstream_ids) == 1, resp.json()["headers"]
        generated = upstream_ids[0]
        assert generated != client_value and REQUEST_ID_SHAPE.fullmatch(generated), generated
        assert resp.header_all("X-Request-ID") == [generated], resp.headers
        seen.add(generated)
        # Refused by the gateway itself: the JSON error names the generated id too.
        resp = _raw_exchange(gw_any, "POST", "/rid-invalid-nokey", [("X-Request-ID", value)])
        doc = assert_json_error(resp.status, resp.headers, resp.body, 400, "missing_shard_key")
        assert doc["request_id"] != client_value and REQUEST_ID_SHAPE.fullmatch(doc["request_id"]), doc
        assert resp.header_all("X-Request-ID") == [doc["request_id"]], resp.headers
        seen.add(doc["request_id"])
    assert len(seen) == 4, f"generated ids must be unique: {seen}"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"r" * 128, "r" * 128),
        (b"AZaz09._:/+=@-", "AZaz09._:/+=@-"),
        (b"550e8400-e29b-41d4-a716-446655440000", "550e8400-e29b-41d4-a716-446655440000"),
        (b"x", "x"),
        (b" \t padded-id", "padded-id"),  # leading OWS is not part of a field value
    ],
    ids=["128", "every-allowed-char", "uuid", "one-char", "leading-ows"],
)
def test_a_valid_client_request_id_is_kept_exactly(gw_any: Gateway, sent: bytes, kept: str) -> None:
    for method, fields in (("POST", [(KEY_HEADER, "rid-ok")]), ("GET", [])):
        resp = _raw_exchange(gw_any, method, "/rid-valid", [*fields, ("X-Request-ID", sent)])
        assert resp.status == 200, resp.body[:300]
        assert _upstream_header(resp.json(), "X-Request-ID") == [kept], resp.json()["headers"]
        assert resp.header_all("X-Request-ID") == [kept], resp.headers
    resp = _raw_exchange(gw_any, "POST", "/rid-valid-nokey", [("X-Request-ID", sent)])
    doc = assert_json_error(resp.status, resp.headers, resp.body, 400, "missing_shard_key")
    assert doc["request_id"] == kept, doc


@pytest.mark.parametrize("tail", [b" ", b"\t", b" \t "], ids=["space", "tab", "mixed"])
def test_a_valid_client_request_id_with_trailing_ows_is_kept(gw_any: Gateway, tail: bytes) -> None:
    """llhttp keeps trailing OWS in a field value; RFC 9110 5.5 says it is not part of it."""
    resp = _raw_exchange(
        gw_any, "POST", "/rid-trailing-ows", [(KEY_HEADER, "rid-ows"), ("X-Request-ID", b"rid-7" + tail)]
    )
    assert resp.status == 200, resp.body[:300]
    assert _upstream_header(resp.json(), "X-Request-ID") == ["rid-7"], resp.json()["headers"]
    assert resp.header_all("X-Request-ID") == ["rid-7"], resp.headers
