"""The request head: what the gateway reads of a client's head, and the head it sends upstream.

Pure functions over the fields llhttp parsed (``(name, value)`` pairs, in order) and the raw
bytes they came in; no sockets. ``read_fields`` classifies each field once by its name (the
answer is cached per spelling in the topology snapshot, since which field is the shard key
depends on the config) into a ``RequestFields``; ``field_block`` forwards the client's field
lines as they came, minus the ones the gateway drops or replaces; ``upstream_head`` adds the
gateway's own fields (DESIGN "Headers").
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

from gateway.proxy.http import CONNECTION_OPTIONS, HOP_BY_HOP, SHARD_PREFIX, VIA_TOKEN, valid_request_id
from gateway.topology import Topology

Fields = Sequence[tuple[bytes, bytes]]

# What the gateway does with a request field.
(
    FORWARD,  # forwarded as it came, not read
    DROP,  # hop-by-hop, or X-Shard-* (only the gateway speaks those upstream)
    KEY,  # the shard key (forwarded)
    CONNECTION,  # dropped; the fields it names are hop-by-hop too
    REQUEST_ID,  # forwarded when it is the one valid id, else replaced
    FORWARDED_FOR,  # replaced: the client's values, then the peer
    FORWARDED_PROTO,  # forwarded; the gateway adds one when there is none
    FORWARDED_HOST,  # likewise
    OPERATION,  # the operation header (forwarded)
    HOST,
    TRACEPARENT,  # forwarded, unless the gateway traces the request (then its own)
    TRACESTATE,
    VIA,  # replaced: chained with the gateway's token
    EXPECT,  # dropped: the gateway answers 100-continue itself
    CONTENT_LENGTH,
    TRANSFER_ENCODING,
) = range(16)

_NAMED_ACTIONS = {
    b"x-request-id": REQUEST_ID,
    b"x-forwarded-for": FORWARDED_FOR,
    b"x-forwarded-proto": FORWARDED_PROTO,
    b"x-forwarded-host": FORWARDED_HOST,
    b"host": HOST,
    b"traceparent": TRACEPARENT,
    b"tracestate": TRACESTATE,
    b"via": VIA,
    b"expect": EXPECT,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
}
_ALWAYS_REMOVED = frozenset({DROP, CONNECTION, FORWARDED_FOR, VIA, EXPECT})
NOT_CACHED = -1  # no action: a spelling not classified yet
ACTION_CACHE_SIZE = 1024  # spellings of field names remembered per topology snapshot
_NO_NAMES: frozenset[bytes] = frozenset()
_OWS = b" \t"


def classify(lname: bytes, topology: Topology | None) -> int:
    """The action for a lower-case field name under ``topology``'s routing config."""
    if topology is not None and lname == topology.key_header:
        return KEY
    if lname in HOP_BY_HOP:
        return CONNECTION if lname == b"connection" else DROP
    if lname.startswith(SHARD_PREFIX):
        return DROP
    if topology is not None and lname == topology.operation_header:
        return OPERATION
    return _NAMED_ACTIONS.get(lname, FORWARD)


class RequestFields:
    """What the gateway read of a request's fields, and which of them it must not forward."""

    __slots__ = (
        "chunked",
        "connection_names",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "has_connection",
        "has_forwarded_host",
        "has_proto",
        "host",
        "host_count",
        "key",
        "key_count",
        "operation",
        "removed",
        "request_id",
        "request_ids",
        "traceparent",
        "traceparent_at",
        "tracestate",
        "via",
    )

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.key_count = 0
        self.host: bytes | None = None
        self.host_count = 0
        self.operation: bytes | None = None
        self.request_id: bytes | None = None  # the client's, when forwarded in place
        self.request_ids = 0
        self.forwarded_for: bytes | None = None  # the client's values, joined
        self.via: bytes | None = None
        self.traceparent: bytes | None = None
        self.traceparent_at = -1  # its index among the fields
        self.tracestate: bytes | None = None
        self.has_proto = False
        self.has_forwarded_host = False
        self.has_connection = False
        self.connection_names: AbstractSet[bytes] = _NO_NAMES
        self.expect_continue = False
        self.chunked = False
        self.content_length = -1  # -1: none, or not compared with the limit (see read_fields)
        self.removed: list[int] | None = None  # indexes of fields not forwarded as they came

    def remove(self, index: int) -> None:
        if self.removed is None:
            self.removed = [index]
        else:
            self.removed.append(index)


def read_fields(
    fields: Fields, actions: dict[bytes, int], topology: Topology | None, length_digits: int
) -> RequestFields:
    """Classify every field (``actions``: the snapshot's cache of name spelling -> action).

    A Content-Length is parsed only when it has at least ``length_digits`` digits, the size of
    the body limit: a shorter number is below the limit anyway.
    """
    read = RequestFields()
    for index, (name, value) in enumerate(fields):
        action = actions.get(name, NOT_CACHED)
        if action == NOT_CACHED:
            action = classify(name.lower(), topology)
            if len(actions) < ACTION_CACHE_SIZE:
                actions[name] = action
        if action != FORWARD:
            _note(read, action, index, value, length_digits)
    if read.request_ids and not (read.request_ids == 1 and valid_request_id(read.request_id)):
        # Kept only when there is exactly one and it is valid; otherwise the gateway's own.
        read.request_id = None
        _remove_all(read, fields, actions, REQUEST_ID)
    if read.connection_names:
        _remove_named(read, fields)
    return read


def _note(read: RequestFields, action: int, index: int, value: bytes, length_digits: int) -> None:
    """Record what one field that is not simply forwarded says. (llhttp strips the OWS before
    a value, not after it: values the gateway uses or repeats lose it here.)"""
    if action == KEY:
        read.key = value
        read.key_count += 1
    elif action == HOST:
        read.host = value.rstrip(_OWS)
        read.host_count += 1
    elif action == CONTENT_LENGTH:
        if len(value) >= length_digits:
            read.content_length = int(value) if value.isdigit() else -1
    elif action == FORWARDED_PROTO:
        read.has_proto = True
    elif action == FORWARDED_HOST:
        read.has_forwarded_host = True
    elif action == OPERATION:
        read.operation = value
    elif action == TRACESTATE:
        read.tracestate = value
    elif action == TRANSFER_ENCODING:
        read.chunked = True
    elif action == REQUEST_ID:
        read.request_id = value.rstrip(_OWS)
        read.request_ids += 1
    elif action == TRACEPARENT:
        read.traceparent = value
        read.traceparent_at = index
    else:
        _note_removed(read, action, index, value)


def _note_removed(read: RequestFields, action: int, index: int, value: bytes) -> None:
    """A field the gateway never forwards as it came."""
    read.remove(index)
    value = value.rstrip(_OWS)
    if action == FORWARDED_FOR:
        read.forwarded_for = value if read.forwarded_for is None else read.forwarded_for + b", " + value
    elif action == VIA:
        read.via = value if read.via is None else read.via + b", " + value
    elif action == CONNECTION:
        read.has_connection = True
        names = {token.strip().lower() for token in value.split(b",")} - CONNECTION_OPTIONS
        if names:
            read.connection_names = set(read.connection_names) | names
    elif action == EXPECT:
        read.expect_continue = read.expect_continue or value.strip().lower() == b"100-continue"


def _remove_all(read: RequestFields, fields: Fields, actions: dict[bytes, int], action: int) -> None:
    for index, (name, _) in enumerate(fields):
        if actions.get(name) == action:
            read.remove(index)


def _remove_named(read: RequestFields, fields: Fields) -> None:
    """Fields a Connection field names are hop-by-hop too (RFC 9110 7.6.1)."""
    for index, (name, _) in enumerate(fields):
        if name.lower() in read.connection_names:
            read.remove(index)


def field_block(raw: bytes | None, fields: Fields, removed: list[int] | None) -> bytes:
    """The client's field lines to forward, each ending in CRLF: as they came in ``raw`` (the
    field lines sliced from the read, when the head arrived whole), else rebuilt from the
    parsed pairs; without the fields at the ``removed`` indexes."""
    if raw is not None:
        return raw if removed is None else without_lines(raw, removed)
    lines = [b"%s: %s" % field for field in fields]
    if removed is None:
        return b"".join([line + b"\r\n" for line in lines])
    gone = set(removed)
    return b"".join([line + b"\r\n" for index, line in enumerate(lines) if index not in gone])


def without_lines(raw: bytes, removed: list[int]) -> bytes:
    """``raw``, field lines each ending in CRLF and one per field (llhttp refuses folded lines),
    without the lines at the ``removed`` indexes: split only up to the last one removed (the
    rest stays one piece), and joined again."""
    gone = sorted(set(removed))  # (a field can be removed for two reasons)
    lines = raw.split(b"\r\n", gone[-1] + 1)
    for index in reversed(gone):  # from the last: deleting a line moves those after it
        del lines[index]
    return b"\r\n".join(lines)


def sliced_field_lines(read: bytes) -> bytes:
    """The field lines of a head that is whole in ``read``, which begins with it: after the
    request line (and the empty lines a server may skip before it, RFC 9112 2.2) up to the
    blank line. llhttp accepted them, so their lines end in CRLF and none is folded."""
    start = 0
    while read[start] in b"\r\n":  # the empty lines, counted in place (lstrip would copy)
        start += 1
    line_end = read.find(b"\r\n", start)
    return read[line_end + 2 : read.find(b"\r\n\r\n", line_end) + 2]


def head_size(target: bytes, fields: Fields) -> int:
    """The size the header limit counts: the target and every name and value (+4 each)."""
    return len(target) + sum(len(name) + len(value) + 4 for name, value in fields)


def upstream_head(
    request_line: bytes,
    forwarded: bytes,
    read: RequestFields,
    request_id: bytes,
    peer: bytes,
    epoch: bytes,
    traceparent: bytes | None,
    http10: bool,
) -> bytes:
    """The head sent upstream, without its final X-Shard-Group line and blank line (those are
    added per attempt: a read's group is its pod's)."""
    gateway_fields = [
        request_line,
        forwarded,
        b"" if read.request_id is not None else b"X-Request-ID: " + request_id + b"\r\n",
        b"X-Forwarded-For: ",
        read.forwarded_for + b", " + peer if read.forwarded_for else peer,
        b"\r\n",
        b"" if read.has_proto else b"X-Forwarded-Proto: http\r\n",
        b"X-Forwarded-Host: " + read.host + b"\r\n" if read.host and not read.has_forwarded_host else b"",
        b"Via: ",
        read.via + b", " + VIA_TOKEN if read.via else VIA_TOKEN,
        b"\r\nX-Shard-Epoch: ",
        epoch,
        b"\r\n",
        b"traceparent: " + traceparent + b"\r\n" if traceparent is not None else b"",
        # Asked in HTTP/1.0, an upstream cannot answer chunked, which such a client could not
        # read; keep-alive is still asked for, for the pool's sake.
        b"Connection: keep-alive\r\n" if http10 else b"",
    ]
    return b"".join(gateway_fields)
