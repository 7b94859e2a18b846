"""The request and response heads as pure functions on bytes (no sockets)."""

from __future__ import annotations

import pytest

from gateway.config import parse_shard_config
from gateway.proxy.request_head import (
    ACTION_CACHE_SIZE,
    RequestFields,
    field_block,
    read_fields,
    sliced_field_lines,
    upstream_head,
    without_lines,
)
from gateway.proxy.response_head import (
    DELIMITED,
    client_head,
    framing,
    parse_head_response,
    without_hop_by_hop,
)
from gateway.topology import Topology, TopologyBuilder

CONFIG = """
version: 1
routing: {key_header: User-ID, operation_header: Operation-Type}
groups: [{name: g1, endpoints: ["127.0.0.1:9000"]}]
"""


@pytest.fixture(scope="module")
def topology() -> Topology:
    return TopologyBuilder().build(parse_shard_config(CONFIG))


def parse(topology: Topology, fields: list[tuple[bytes, bytes]]) -> RequestFields:
    return read_fields(fields, {}, topology, length_digits=9)


def block(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % f for f in fields)


INGRESS = [
    (b"Host", b"api.example.com"),
    (b"X-Request-ID", b"0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
    (b"X-Real-IP", b"203.0.113.9"),
    (b"X-Forwarded-For", b"203.0.113.9"),
    (b"X-Forwarded-Host", b"api.example.com"),
    (b"X-Forwarded-Port", b"443"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Scheme", b"https"),
    (b"X-Scheme", b"https"),
    (b"User-ID", b"alice"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    (b"Content-Length", b"2"),
]


def test_an_ingress_head_loses_only_its_forwarded_for_line(topology: Topology) -> None:
    read = parse(topology, INGRESS)
    assert read.removed == [3]  # X-Forwarded-For: replaced by the client's values + the peer
    assert read.key == b"alice" and read.host == b"api.example.com" and read.host_count == 1
    assert read.request_id == INGRESS[1][1]  # one valid id: kept in place
    assert read.has_proto and read.has_forwarded_host
    kept = [f for i, f in enumerate(INGRESS) if i != 3]
    assert field_block(block(INGRESS), INGRESS, read.removed) == block(kept)
    assert field_block(None, INGRESS, read.removed) == block(kept)


def test_cached_actions_give_the_same_reading(topology: Topology) -> None:
    actions: dict[bytes, int] = {}
    first = read_fields(INGRESS, actions, topology, 9)
    assert set(actions) == {name for name, _ in INGRESS}  # each spelling classified once
    again = read_fields(INGRESS, actions, topology, 9)  # now every action comes from the cache
    for slot in ("removed", "key", "host", "request_id", "forwarded_for", "traceparent_at", "has_proto"):
        assert getattr(again, slot) == getattr(first, slot), slot


def test_the_action_cache_is_bounded(topology: Topology) -> None:
    actions = {b"x-filler-%d" % i: 0 for i in range(ACTION_CACHE_SIZE)}
    read = read_fields([(b"User-ID", b"bob")], actions, topology, 9)
    assert read.key == b"bob" and len(actions) == ACTION_CACHE_SIZE  # classified, not cached


def test_the_head_sent_upstream_adds_the_gateways_fields(topology: Topology) -> None:
    read = parse(topology, INGRESS)
    forwarded = field_block(None, INGRESS, read.removed)
    head = upstream_head(b"POST /o HTTP/1.1\r\n", forwarded, read, b"gen-1", b"10.0.0.7", b"e1", None, False)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /o HTTP/1.1"
    assert b"X-Forwarded-For: 203.0.113.9, 10.0.0.7" in lines
    assert b"Via: 1.1 shardgate" in lines and b"X-Shard-Epoch: e1" in lines
    assert not any(line.startswith(b"X-Request-ID: gen") for line in lines)  # the client's is kept
    assert b"X-Forwarded-Proto: http" not in lines  # the client's is kept
    assert head.endswith(b"\r\n") and not head.endswith(b"\r\n\r\n")  # X-Shard-Group comes last


@pytest.mark.parametrize(
    "ids",
    [
        [b"has space"],
        [b"x" * 129],
        ["n\u00e9".encode()],
        [b""],
        [b"one", b"two"],  # two: neither is kept
    ],
)
def test_an_invalid_or_repeated_request_id_is_replaced(topology: Topology, ids: list[bytes]) -> None:
    fields = [(b"Host", b"h"), *((b"X-Request-ID", i) for i in ids)]
    read = parse(topology, fields)
    assert read.request_id is None
    assert read.removed == list(range(1, len(fields)))


def test_trailing_whitespace_is_not_part_of_a_value(topology: Topology) -> None:
    """llhttp strips the OWS before a value, not after it."""
    read = parse(topology, [(b"Host", b"a.test \t"), (b"X-Request-ID", b"abc \t"), (b"Via", b"1.0 a ")])
    assert (read.host, read.request_id, read.via) == (b"a.test", b"abc", b"1.0 a")


def test_forwarded_for_and_via_are_combined_in_order(topology: Topology) -> None:
    fields = [
        (b"X-Forwarded-For", b"a"),
        (b"Via", b"1.0 one"),
        (b"x-forwarded-for", b"b, c"),
        (b"VIA", b"1.1 two"),
    ]
    read = parse(topology, fields)
    assert read.forwarded_for == b"a, b, c" and read.via == b"1.0 one, 1.1 two"
    assert read.removed == [0, 1, 2, 3]


def test_hop_by_hop_shard_and_connection_named_fields_are_dropped(topology: Topology) -> None:
    fields = [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Hop", b"1"),
        (b"X-Shard-Group", b"forged"),
        (b"TE", b"trailers"),
        (b"Expect", b"100-continue"),
        (b"X-Kept", b"yes"),
    ]
    read = parse(topology, fields)
    assert sorted(read.removed or []) == [0, 1, 2, 3, 4, 5]
    assert read.expect_continue and read.has_connection
    assert field_block(block(fields), fields, read.removed) == b"X-Kept: yes\r\n"


LINES = [b"A: 0", b"B: 1", b"C: 2", b"D: 3", b"E: 4"]


@pytest.mark.parametrize(
    "removed",
    [[0], [2], [4], [1, 3], [2, 3], [3, 2], [0, 1, 2, 3, 4], [2, 2], [4, 0], [3, 1, 3]],
    ids=["first", "middle", "last", "several", "adjacent", "unsorted", "all", "twice", "ends", "mixed"],
)
def test_removed_lines_are_cut_out_of_the_raw_block(removed: list[int]) -> None:
    raw = b"".join(line + b"\r\n" for line in LINES)
    kept = b"".join(line + b"\r\n" for i, line in enumerate(LINES) if i not in removed)
    assert without_lines(raw, removed) == kept
    fields = [tuple(line.split(b": ")) for line in LINES]
    assert field_block(raw, fields, removed) == kept
    assert field_block(None, fields, removed) == kept  # rebuilt from the pairs: the same


def test_a_raw_block_with_nothing_removed_is_forwarded_as_it_is() -> None:
    raw = b"A: 0\r\nB:  1 \r\n"
    assert field_block(raw, [(b"A", b"0"), (b"B", b"1 ")], None) is raw


def test_a_raw_block_shorter_than_its_fields_is_an_error_not_a_guess() -> None:
    with pytest.raises(IndexError):
        without_lines(b"A: 0\r\n", [3])


def test_a_sliced_head_is_found_after_empty_lines() -> None:
    read = b"\r\n\n\rGET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\nbody"
    assert sliced_field_lines(read) == b"Host: a\r\nX: 1\r\n"


def test_content_length_is_read_only_when_it_could_exceed_the_limit(topology: Topology) -> None:
    assert parse(topology, [(b"Content-Length", b"12345678")]).content_length == -1
    assert parse(topology, [(b"Content-Length", b"123456789")]).content_length == 123456789


# -- the response head ---------------------------------------------------------------------------


def test_the_common_response_head_loses_only_its_keep_alive_field() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-A: b\r\n\r\n"
    kept, lower = client_head(head)
    assert kept == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b"
    assert framing(lower, 200, False, False).until_close is False


def test_hop_by_hop_and_gateway_fields_of_a_response_are_dropped() -> None:
    fields = b"\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-Request-ID: theirs\r\nX-Kept: 2"
    assert without_hop_by_hop(fields, fields.lower()) == b"\r\nX-Kept: 2"
    kept, _ = client_head(b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nX-Shard-Group: x\r\n\r\n")
    assert kept == b"HTTP/1.1 200 OK"  # spoken to the client in HTTP/1.1


@pytest.mark.parametrize(
    ("head", "status", "head_only", "http10", "until_close", "dechunk"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", 200, False, False, True, False),  # no length: ends at close
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, False, False, False, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200, False, True, False, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200, True, True, False, False),
    ],
)
def test_framing(
    head: bytes, status: int, head_only: bool, http10: bool, until_close: bool, dechunk: bool
) -> None:
    found = framing(head.lower(), status, head_only, http10)
    assert (found.until_close, found.dechunk) == (until_close, dechunk)
    assert found is not DELIMITED


def test_a_head_response_is_delimited_by_hand() -> None:
    buffer = bytearray(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    found = parse_head_response(buffer)
    assert not isinstance(found, bool) and found is not None
    assert (found.status, found.keep_alive) == (200, True)
    assert parse_head_response(bytearray(b"HTTP/1.1 200 OK\r\n")) is None
    assert parse_head_response(bytearray(b"garbage\r\n\r\n")) is False
