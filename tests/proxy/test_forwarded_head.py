"""Property: whatever empty lines precede a request and however its bytes are split into
reads, the upstream receives exactly one request line and the client's field lines, in order,
byte for byte (RFC 9112 2.2 lets a server skip empty lines before a request line; llhttp does).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.harness import KEY_HEADER, Harness, harness, responses_in

# Fields the gateway forwards as they came (it drops hop-by-hop and X-Shard-* fields, and
# replaces X-Request-ID, X-Forwarded-For, Via and traceparent with its own).
TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12
)
# (not the X- fields the gateway reads and may replace: X-Request-ID, X-Forwarded-For, X-Shard-*)
FIELD_NAME = TOKEN.map(lambda t: "X-" + t).filter(
    lambda name: (
        name.lower() not in ("x-request-id", "x-forwarded-for") and not name.lower().startswith("x-shard-")
    )
)
FIELD_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
LEADING = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n"]), max_size=6).map(b"".join)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes]]:
    """(request line, the request's bytes, the field lines that must arrive unchanged)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    target = "/" + draw(st.text(alphabet="abcdefghij0123456789/._-", max_size=20))
    fields = [("Host", "gateway.test"), (KEY_HEADER, "user-" + draw(TOKEN))]
    fields += draw(st.lists(st.tuples(FIELD_NAME, FIELD_VALUE), max_size=8))
    body = draw(st.binary(max_size=40)) if method in ("POST", "PUT") else b""
    if body or method in ("POST", "PUT"):
        fields.append(("Content-Length", str(len(body))))
    draw(st.randoms()).shuffle(fields)
    lines = [f"{name}: {value}".encode() for name, value in fields]
    request_line = f"{method} {target} HTTP/1.1".encode()
    data = request_line + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body
    return request_line, data, lines


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


@pytest.fixture(scope="module")
def plane() -> Iterator[Harness]:
    with harness() as h:
        yield h


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    first=requests(),
    second=requests(),
    leading=st.tuples(LEADING, LEADING),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_upstream_gets_one_request_line_and_the_same_fields(
    plane: Harness,
    first: tuple[bytes, bytes, list[bytes]],
    second: tuple[bytes, bytes, list[bytes]],
    leading: tuple[bytes, bytes],
    cuts: list[int],
) -> None:
    """Two requests on one connection, each after its own empty lines, cut into reads anywhere."""
    wire = leading[0] + first[1] + leading[1] + second[1]
    before = len(plane.upstream.heads)
    client, transport = plane.connect()
    plane.feed(client, [piece for piece in split(wire, cuts) if piece])
    plane.wait_for(lambda: len(responses_in(transport.written)) == 2)
    assert [status for status, _, _ in responses_in(transport.written)] == [200, 200]
    received = plane.upstream.heads[before:]
    assert len(received) == 2
    for (request_line, _, lines), head in zip((first, second), received, strict=True):
        assert head.request_line == request_line
        forwarded = head.lines[1:]
        assert not any(line.startswith((b"GET ", b"POST ", b"PUT ", b"DELETE ")) for line in forwarded), (
            head.raw
        )
        assert forwarded[: len(lines)] == lines, head.raw  # the client's, in order; then the gateway's
    transport.close()


def test_the_reported_case_leading_bare_crs(plane: Harness) -> None:
    """``\\r\\r\\r\\r\\r\\nGET /x HTTP/1.1`` in one read was forwarded with its request line twice."""
    client, transport = plane.connect()
    before = len(plane.upstream.heads)
    plane.feed(client, [b"\r\r\r\r\r\nGET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n"])
    plane.wait_for(lambda: len(responses_in(transport.written)) == 1)
    head = plane.upstream.heads[before]
    assert head.lines[:3] == [b"GET /x HTTP/1.1", b"Host: a", b"X-A: 1"]
    transport.close()
