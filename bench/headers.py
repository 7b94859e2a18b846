"""The header check: what each proxy sends upstream and back, and whether it matches the gateway's rules.

Right after a system starts, the harness sends it a few requests for `HEADERS_PATH`. A backend
relays such a request to `CaptureServer` (a unix socket in the harness, see
`configs.render_backends_nginx`), which answers with the request head exactly as it arrived; so
the client gets back both what the proxy sent upstream and the proxy's own response fields.
The backend's nginx relays every field line as it came, except the hop-by-hop ones it sets itself
(`Connection`), which this check therefore does not look at.

Probes: the first Ingress-shaped and the first bare benchmark request, and a "chained" one (bare,
plus a client `X-Forwarded-For`, a `Via`, an invalid `X-Request-ID` and a forged
`X-Shard-Epoch`). Each is checked against what the gateway does (gateway/proxy/request_head.py): a
field sent as several lines counts as one comma-joined list (RFC 9110 5.3), so HAProxy's added
`X-Forwarded-For`/`Via` lines equal the gateway's appended values.
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.configs import HEADERS_PATH, HOST, REQUEST_ID_REGEX
from bench.shapes import Headers, format_request, request_parts

TIMEOUT_S = 5.0
PEER = HOST  # the address every proxy sees the harness connect from

# Fields the rules below look at; every other field the client sent must arrive unchanged.
_HANDLED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "via",
        "x-shard-epoch",
        "x-shard-group",
        "content-length",
        "connection",
    }
)
# Shown in the report, in this order: (where, field).
SHOWN: tuple[tuple[str, str], ...] = (
    ("upstream", "X-Forwarded-For"),
    ("upstream", "X-Forwarded-Proto"),
    ("upstream", "X-Forwarded-Host"),
    ("upstream", "X-Request-ID"),
    ("upstream", "Via"),
    ("upstream", "X-Shard-Epoch"),
    ("upstream", "X-Shard-Group"),
    ("response", "X-Request-ID"),
    ("response", "X-Shard-Group"),
)
_VALID_ID = re.compile(REQUEST_ID_REGEX)


# ---------------------------------------------------------------------------------- capture


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _read_message(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(head, body) of one Content-Length-framed HTTP message, or None if the peer closed early."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = _content_length(head)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body[:length]


class _EchoHead(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TIMEOUT_S)
        with contextlib.suppress(OSError):
            message = _read_message(sock)
            if message is None:
                return
            echo = message[0] + b"\r\n\r\n"
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(echo), echo)
            )


class CaptureServer:
    """A unix-socket HTTP server that answers every request with its own head (in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server = socketserver.ThreadingUnixStreamServer(str(path), _EchoHead)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="capture", daemon=True)

    def start(self) -> CaptureServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(TIMEOUT_S)
        with contextlib.suppress(OSError):
            self.path.unlink()


# ---------------------------------------------------------------------------------- probes


@dataclass
class Probe:
    name: str
    sent: Headers
    status: int = 0
    upstream: Headers = field(default_factory=list)  # the head the backend received
    response: Headers = field(default_factory=list)  # the response fields the client got
    problems: list[str] = field(default_factory=list)


@dataclass
class HeaderCheck:
    probes: list[Probe]

    @property
    def problems(self) -> list[str]:
        return [f"{probe.name}: {problem}" for probe in self.probes for problem in probe.problems]

    def probe(self, name: str) -> Probe | None:
        return next((probe for probe in self.probes if probe.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"problems": self.problems, "probes": [asdict(probe) for probe in self.probes]}


def probe_requests() -> list[tuple[str, Headers, bytes]]:
    """(name, fields, body) of each probe; the first two are benchmark requests as wrk sends them."""
    ingress, ingress_body = request_parts("ingress", 0)
    bare, bare_body = request_parts("bare", 0)
    chained = [
        *bare[:-1],
        ("X-Forwarded-For", "192.0.2.10"),
        ("Via", "1.1 edge"),
        ("X-Request-ID", "not a valid id!"),
        ("X-Shard-Epoch", "forged"),
        bare[-1],  # Content-Length
    ]
    return [("ingress", ingress, ingress_body), ("bare", bare, bare_body), ("chained", chained, bare_body)]


def _parse_fields(head: bytes) -> Headers:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [
        (name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines if line)
    ]


def _exchange(port: int, data: bytes) -> tuple[int, Headers, bytes]:
    with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        message = _read_message(sock)
    if message is None:
        raise ConnectionError("the connection closed before the response was complete")
    head, body = message
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    return status, _parse_fields(head), body


def check_headers(port: int, epoch: str) -> HeaderCheck:
    """Send every probe to the proxy on ``port`` and check what came through."""
    probes: list[Probe] = []
    for name, fields, body in probe_requests():
        probe = Probe(name, fields)
        try:
            probe.status, probe.response, echo = _exchange(
                port, format_request("POST", HEADERS_PATH, fields, body)
            )
        except (OSError, ValueError) as exc:
            probe.problems.append(f"no answer: {type(exc).__name__}: {exc}")
            probes.append(probe)
            continue
        if probe.status != 200:
            probe.problems.append(f"status {probe.status}, not 200")
        else:
            probe.upstream = _parse_fields(echo.split(b"\r\n\r\n", 1)[0])
            probe.problems = parity_problems(fields, probe.upstream, probe.response, epoch)
        probes.append(probe)
    return HeaderCheck(probes)


# ---------------------------------------------------------------------------------- rules


def joined(fields: Sequence[tuple[str, str]], name: str) -> str | None:
    """The field's value, its lines joined with ", " (None if absent)."""
    values = [value for field_name, value in fields if field_name.lower() == name.lower()]
    return ", ".join(values) if values else None


def _lines_of(fields: Sequence[tuple[str, str]], name: str) -> int:
    return sum(1 for field_name, _ in fields if field_name.lower() == name.lower())


def parity_problems(sent: Headers, upstream: Headers, response: Headers, epoch: str) -> list[str]:
    """How the upstream's and the client's fields differ from what the gateway's rules give."""
    problems: list[str] = []

    def expect(where: str, name: str, got: str | None, want: str | None) -> None:
        if got != want:
            problems.append(f"{where} {name} is {got!r}, expected {want!r}")

    client_for = joined(sent, "x-forwarded-for")
    expect("upstream", "X-Forwarded-For", joined(upstream, "x-forwarded-for"),
           f"{client_for}, {PEER}" if client_for else PEER)  # fmt: skip
    expect("upstream", "X-Forwarded-Proto", joined(upstream, "x-forwarded-proto"),
           joined(sent, "x-forwarded-proto") or "http")  # fmt: skip
    expect("upstream", "X-Forwarded-Host", joined(upstream, "x-forwarded-host"),
           joined(sent, "x-forwarded-host") or joined(sent, "host"))  # fmt: skip
    problems += _request_id_problems(joined(sent, "x-request-id"), upstream, response)
    problems += _via_problems(joined(sent, "via"), joined(upstream, "via"))
    if _lines_of(upstream, "x-shard-epoch") != 1:
        problems.append(f"upstream X-Shard-Epoch sent {_lines_of(upstream, 'x-shard-epoch')} times, not once")
    expect("upstream", "X-Shard-Epoch", joined(upstream, "x-shard-epoch"), epoch)
    for where, fields in (("upstream", upstream), ("response", response)):
        if not joined(fields, "x-shard-group"):
            problems.append(f"{where} X-Shard-Group is missing")
    for name, _ in sent:
        if name.lower() not in _HANDLED:
            expect("upstream", name, joined(upstream, name), joined(sent, name))
    return problems


def _request_id_problems(sent: str | None, upstream: Headers, response: Headers) -> list[str]:
    got = joined(upstream, "x-request-id")
    problems = []
    if sent is not None and _VALID_ID.fullmatch(sent):
        if got != sent:
            problems.append(f"upstream X-Request-ID is {got!r}, expected the client's {sent!r}")
    elif not got or got == sent or not _VALID_ID.fullmatch(got):
        problems.append(
            f"upstream X-Request-ID is {got!r}, expected a new valid id (the client sent {sent!r})"
        )
    if _lines_of(upstream, "x-request-id") > 1:
        problems.append("upstream X-Request-ID sent more than once")
    answered = joined(response, "x-request-id")
    if answered != got:
        problems.append(f"response X-Request-ID is {answered!r}, expected the upstream's {got!r}")
    return problems


def _via_problems(sent: str | None, got: str | None) -> list[str]:
    before = [item.strip() for item in sent.split(",")] if sent else []
    items = [item.strip() for item in got.split(",")] if got else []
    if items[:-1] != before or not items or not items[-1].startswith("1.1 "):
        return [
            f"upstream Via is {got!r}, expected the client's {sent!r} followed by this proxy's '1.1 NAME'"
        ]
    return []
