"""The response head as the client gets it, and the de-chunking an HTTP/1.0 client needs.

Pure functions over the raw head bytes an upstream sent; no sockets. The head is rewritten in
place: hop-by-hop fields out (and those its Connection field names), the gateway's
``X-Shard-Group`` and ``X-Request-ID`` in, everything else byte for byte; bodies keep the
framing they came with, except toward an HTTP/1.0 client, which cannot read chunks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from httptools import HttpResponseParser

from gateway.proxy.http import CONNECTION_OPTIONS, HOP_BY_HOP

NO_BODY_STATUSES = frozenset({204, 304})
# Response fields the gateway sets itself; an upstream's copy would duplicate them.
_GATEWAY_FIELDS = frozenset({b"x-shard-group", b"x-request-id"})
_KEEP_ALIVE_FIELD = b"\r\nconnection: keep-alive"
# A field the client must not get from the upstream (searched in the lower-cased field block).
_REWRITE = re.compile(rb"\r\n(?:" + b"|".join(sorted(HOP_BY_HOP | _GATEWAY_FIELDS)) + rb")[ \t]*:")
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[^\r]*close")
_CLOSE_FIELD = b"\r\nConnection: close"
_KEEP_ALIVE = b"\r\nConnection: keep-alive"


class Framing:
    """How the body after a response head ends, as far as the gateway must know."""

    __slots__ = ("chunked", "dechunk", "until_close")

    def __init__(self, chunked: bool, until_close: bool, dechunk: bool) -> None:
        self.chunked = chunked
        self.until_close = until_close  # no length, not chunked: the body ends at the close
        self.dechunk = dechunk  # chunked, toward a client that cannot read chunks


DELIMITED = Framing(False, False, False)  # llhttp found the end already, or there is no body


def client_head(head: bytes) -> tuple[bytes, bytes]:
    """The response head without its blank line and hop-by-hop fields, in HTTP/1.1 (what the
    gateway speaks to clients); and its lower-cased copy, for the framing lookups."""
    if not head.startswith(b"HTTP/1.1 "):
        head = b"HTTP/1.1" + head[8:]
    end = len(head) - 4  # the fields end here
    lower = head.lower()  # (the status line cannot match a "\r\n"-led search)
    hop = _REWRITE.search(lower)
    if hop is None:
        return head[:end], lower
    at = hop.start()
    stop = at + len(_KEEP_ALIVE_FIELD)
    if lower.startswith(_KEEP_ALIVE_FIELD, at) and (
        stop == end or (lower.startswith(b"\r\n", stop) and _REWRITE.search(lower, stop) is None)
    ):
        # Just "Connection: keep-alive" (nginx, most servers): cut that one field.
        # (``lower`` keeps it: only framing fields are looked up in it.)
        return (head[:at] if stop == end else head[:at] + head[stop:end]), lower
    line_end = head.find(b"\r\n")
    kept = head[:line_end] + without_hop_by_hop(head[line_end:end], lower[line_end:end])
    return kept, kept.lower()


def framing(lower: bytes, status: int, head_only: bool, http10: bool) -> Framing:
    """How the body after this head ends (``lower``: the lower-cased head, fields kept)."""
    # (bytes.find: ``in`` on bytes goes through the buffer protocol and costs more.)
    has_length = lower.find(b"\r\ncontent-length:") >= 0
    # llhttp refuses a response with both, so only one without a length can be chunked.
    chunked = not has_length and lower.find(b"\r\ntransfer-encoding:") >= 0 and is_chunked(lower)
    bodiless = head_only or status in NO_BODY_STATUSES or 100 <= status < 200
    return Framing(
        chunked, not bodiless and not has_length and not chunked, chunked and http10 and not head_only
    )


def finish_head(kept: bytes, group: bytes, request_id: bytes, connection: bytes, body: bytes) -> bytes:
    """The head as sent to the client, with ``body`` bytes that came with it, in one join."""
    return b"".join(
        (
            kept,
            b"\r\nX-Shard-Group: ",
            group,
            b"\r\nX-Request-ID: ",
            request_id,
            connection,
            b"\r\n\r\n",
            body,
        )
    )


def connection_field(close: bool, http10: bool) -> bytes:
    """What the client is told about its connection (HTTP/1.0 keeps alive only when told)."""
    if close:
        return _CLOSE_FIELD
    return _KEEP_ALIVE if http10 else b""


def without_transfer_encoding(kept: bytes) -> bytes:
    """A head whose chunked body is sent de-chunked: its Transfer-Encoding goes."""
    line_end = kept.find(b"\r\n")
    return kept[:line_end] + without_fields(kept[line_end:], kept[line_end:].lower(), {b"transfer-encoding"})


def without_hop_by_hop(fields: bytes, lower: bytes) -> bytes:
    """Drop hop-by-hop fields (and those the Connection field names) and the gateway's own."""
    pieces = []
    kept_from = 0
    named: set[bytes] = set()
    for match in _REWRITE.finditer(lower):
        start = match.start()
        end = lower.find(b"\r\n", match.end())
        if end < 0:
            end = len(lower)
        if lower.startswith(b"\r\nconnection", start):
            tokens = lower[match.end() : end].split(b",")
            named.update(t.strip() for t in tokens if t.strip() not in CONNECTION_OPTIONS)
        pieces.append(fields[kept_from:start])
        kept_from = end
    pieces.append(fields[kept_from:])
    result = b"".join(pieces)
    if named:  # "Connection: X-Foo" makes X-Foo hop-by-hop too (rare)
        result = without_fields(result, result.lower(), named)
    return result


def without_fields(fields: bytes, lower: bytes, names: AbstractSet[bytes]) -> bytes:
    """``fields`` (a "\\r\\nName: value" sequence) without the fields called ``names``."""
    kept = []
    start = 0
    while start < len(fields):
        end = fields.find(b"\r\n", start + 2)
        if end < 0:
            end = len(fields)
        name = lower[start + 2 : end].split(b":", 1)[0].rstrip()
        if name not in names:
            kept.append(fields[start:end])
        start = end
    return b"".join(kept)


def is_chunked(lower: bytes) -> bool:
    at = lower.find(b"\r\ntransfer-encoding:")
    if at < 0:
        return False
    end = lower.find(b"\r\n", at + 2)
    return lower[at : end if end >= 0 else len(lower)].rstrip().endswith(b"chunked")


class HeadResponse:
    """A response to HEAD, delimited by hand: llhttp cannot be told that no body follows."""

    __slots__ = ("head", "keep_alive", "status")

    def __init__(self, head: bytes, status: int, keep_alive: bool) -> None:
        self.head = head
        self.status = status
        self.keep_alive = keep_alive


HEAD_LIMIT = 65536


def parse_head_response(buffer: bytearray) -> HeadResponse | bool | None:
    """The final response head at the start of ``buffer`` (interim 1xx heads are consumed);
    None while it is incomplete, False when it is not a valid HTTP/1.x response head."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False if len(buffer) > HEAD_LIMIT else None
        head = bytes(buffer[: end + 4])
        rest = buffer[end + 4 :]
        version, _, rest_of_line = head.partition(b" ")
        code = rest_of_line[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            return False
        if int(code) < 200:
            buffer[:] = rest
            continue
        keep_alive = not rest and version == b"HTTP/1.1" and _CONNECTION_CLOSE.search(head.lower()) is None
        return HeadResponse(head, int(code), keep_alive)


class Dechunker:
    """Turns chunked body bytes into plain ones, for a client that cannot read chunks."""

    __slots__ = ("_parser", "on_body")

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.on_body = send  # llhttp's callback for each piece of chunk data
        self._parser = HttpResponseParser(self)
        self._parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

    def feed(self, data: bytes | memoryview) -> None:
        self._parser.feed_data(data)
