"""In-process data-plane harness: the gateway's client-side protocol fed by a fake transport,
in front of a real upstream server on 127.0.0.1, on one uvloop event loop.

The client side is driven byte for byte (each ``data_received`` is one read, so a test decides
exactly how a request is split across reads, which a real socket would not let it do); the
upstream side is real: the gateway opens real connections to ``RecordingUpstream``, which keeps
every request head as it arrived on the wire. This is the shape of uvicorn's in-process
protocol tests (tests/protocols/test_http.py), beside the process-level suites.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvloop

from gateway.config import Limits, parse_shard_config
from gateway.observability.metrics import Metrics
from gateway.proxy.client import ClientConnection
from gateway.proxy.context import ProxyContext
from gateway.topology import TopologyBuilder, TopologyHolder

KEY_HEADER = "User-ID"
RESPONSE_BODY = b"ok"
_T = TypeVar("_T")


class FakeTransport:
    """What the gateway's client protocol is given instead of a socket transport."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int] = ("192.0.2.10", 40000)
    ) -> None:
        self.loop = loop
        self.peer = peer
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.aborted = False
        self.protocol: ClientConnection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.protocol is not None:  # as a real transport does, on a later loop iteration
            self.loop.call_soon(self.protocol.connection_lost, None)


@dataclass
class RecordedHead:
    raw: bytes  # the request head exactly as it arrived, up to and including the blank line

    @property
    def lines(self) -> list[bytes]:
        return self.raw[:-4].split(b"\r\n")

    @property
    def request_line(self) -> bytes:
        return self.lines[0]

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        pairs = [line.split(b":", 1) for line in self.lines[1:]]
        return [(name, value.strip(b" \t")) for name, value in pairs]


@dataclass
class RecordingUpstream:
    """A pod: reads Content-Length-framed requests, answers each ``200 ok``, keeps the heads
    (and bodies). A request for ``/hold...`` is answered once ``release`` is set. Subclasses
    change ``wait_to_answer`` and ``answer``."""

    heads: list[RecordedHead] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                head = RecordedHead(raw)
                self.heads.append(head)
                length = next((int(v) for n, v in head.fields if n.lower() == b"content-length"), 0)
                self.bodies.append(await reader.readexactly(length))
                await self.wait_to_answer(head)
                writer.write(self.answer(head))
                await writer.drain()
        writer.close()

    async def wait_to_answer(self, head: RecordedHead) -> None:
        if head.request_line.split(b" ")[1].startswith(b"/hold"):
            await self.release.wait()

    def answer(self, head: RecordedHead) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY)


def shard_config(port: int) -> str:
    return (
        "version: 1\n"
        f"routing: {{key_header: {KEY_HEADER}}}\n"
        f'groups:\n  - name: g1\n    endpoints: ["127.0.0.1:{port}"]\n'
    )


class Harness:
    """One event loop, one upstream, one data-plane context; ``connect()`` makes a client."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.loop = uvloop.new_event_loop()
        self.upstream = RecordingUpstream()
        self.run(self.upstream.start())
        self.metrics = Metrics()
        self.holder = TopologyHolder(log_changes=False)
        self.holder.swap(TopologyBuilder().build(parse_shard_config(shard_config(self.upstream.port))))
        self.ctx = ProxyContext(self.loop, self.holder, self.metrics, limits or Limits())

    def run(self, awaitable: Awaitable[_T]) -> _T:
        async def wrapped() -> _T:
            return await awaitable

        return self.loop.run_until_complete(wrapped())

    def connect(self) -> tuple[ClientConnection, FakeTransport]:
        client = ClientConnection(self.ctx)
        transport = FakeTransport(self.loop)
        transport.protocol = client
        client.connection_made(transport)  # type: ignore[arg-type]
        return client, transport

    def feed(self, client: ClientConnection, reads: Iterable[bytes]) -> None:
        """Each item is one read of the client socket."""

        async def feed_all() -> None:
            for data in reads:
                client.data_received(data)
                await asyncio.sleep(0)  # let the loop run between reads, as sockets do

        self.run(feed_all())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def poll() -> None:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() > deadline:
                    raise AssertionError("condition not met in time")
                await asyncio.sleep(0.001)

        self.run(poll())

    def close(self) -> None:
        for client in list(self.ctx.clients):
            if client.transport is not None:
                client.transport.abort()
        for upstream in list(self.ctx.upstreams):
            upstream.abort()
        self.run(self.upstream.stop())
        self.run(asyncio.sleep(0))
        self.loop.close()


def responses_in(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """(status, lower-case headers, body) of each Content-Length-framed response in ``data``."""
    out = []
    rest = bytes(data)
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        out.append((status, headers, rest[:length]))
        rest = rest[length:]
    return out


@contextlib.contextmanager
def harness(limits: Limits | None = None) -> Iterator[Harness]:
    h = Harness(limits)
    try:
        yield h
    finally:
        h.close()
