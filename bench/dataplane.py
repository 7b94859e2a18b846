"""In-process data-plane benchmark: one client connection and its upstream connections, no sockets.

Drives a real ``ClientConnection`` (gateway/proxy/client.py) and the ``UpstreamConnection``s of
the pods it routes to (gateway/proxy/upstream.py) with fake transports, through N keep-alive
POSTs, each answered by a canned upstream response; everything else is the gateway's own code
(httptools parsing, the request-head rebuild, routing on a real topology snapshot, pooling,
response-head rewrite, metrics). No event loop runs: the harness calls ``data_received`` on the
client with a whole request, then on the upstream connection the request went to with a whole
response. What one request costs here is what the interpreter (or the compiled modules) spends
per request, without the kernel and the loop's I/O.

Requests (``--shape``):
- ``ingress``: a POST as an Ingress forwards it: Host, User-Agent, Accept, Content-Type,
  Content-Length, User-ID, X-Forwarded-For, X-Real-IP, X-Request-ID, X-Forwarded-Host,
  X-Forwarded-Port, X-Forwarded-Proto, X-Forwarded-Scheme, traceparent; a small JSON body.
- ``bare``: Host, Content-Length, Content-Type, User-ID and the same body.
``User-ID`` cycles over ``KEYS`` ids (all in the ring's key cache after the warm-up, as under a
steady load); the topology is the benchmark's 3 groups x 2 pods.

Figures:
- wall clock (default): ``--repeats`` timed runs of ``--requests`` requests (GC as in
  production: on), median us/request; noisy on a shared machine, compare within one run;
- ``--callgrind``: runs this module twice under ``valgrind --tool=callgrind`` (with N and 2N
  requests, PYTHONHASHSEED=0) and reports (Ir(2N) - Ir(N)) / N instructions per request: start-up,
  imports and the warm-up cancel out, and the count does not depend on the machine's load.

The time source is a counter (``ProxyContext.loop.time`` is a C-level ``count.__next__``), so
that nothing depends on the clock: the same run executes the same instructions every time.

    .venv/bin/python -m bench.dataplane                     # both shapes, wall clock
    .venv/bin/python -m bench.dataplane --callgrind --requests 2000
    SHARDGATE_PURE_PYTHON=1 .venv/bin/python -m bench.dataplane   # the .py modules
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Any

from gateway import build
from gateway.config import Limits, parse_shard_config
from gateway.observability.metrics import Metrics
from gateway.proxy.client import ClientConnection
from gateway.proxy.context import ProxyContext
from gateway.proxy.upstream import UpstreamConnection
from gateway.topology import TopologyBuilder, TopologyHolder

KEYS = 64
WARMUP = 500
SHAPES = ("ingress", "bare")
BODY = b'{"order_id":12345,"items":[{"sku":"A-1","qty":2}],"note":"benchmark"}'
RESPONSE_BODY = b'{"ok":true,"id":12345}'
# What nginx sends back for a small JSON answer (Connection: keep-alive is the field it adds).
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Mon, 01 Dec 2025 12:00:00 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY)
)
CONFIG = """\
version: 1
routing:
  key_header: User-ID
ring:
  vnodes: 160
groups:
  - {name: group-1, endpoints: ["10.0.1.1:8080", "10.0.1.2:8080"]}
  - {name: group-2, endpoints: ["10.0.2.1:8080", "10.0.2.2:8080"]}
  - {name: group-3, endpoints: ["10.0.3.1:8080", "10.0.3.2:8080"]}
"""


def request(shape: str, user: str) -> bytes:
    fields = [
        ("Host", "api.example.com"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(BODY))),
        ("User-ID", user),
    ]
    if shape == "ingress":
        fields = [
            ("Host", "api.example.com"),
            ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"),
            ("Accept", "application/json, text/plain, */*"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(BODY))),
            ("User-ID", user),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Real-IP", "203.0.113.7"),
            ("X-Request-ID", "4f6c1d2e9a8b7c6d5e4f3a2b1c0d9e8f"),
            ("X-Forwarded-Host", "api.example.com"),
            ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Scheme", "https"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ]
    head = "POST /orders HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields)
    return head.encode() + b"\r\n" + BODY


class FakeTransport:
    """What the protocols call on a uvloop transport; ``write`` is a C-level bounded append."""

    def __init__(self, extra: dict[str, Any]) -> None:
        self.sent: deque[bytes] = deque(maxlen=1)  # the last write, for the checks
        self.write: Callable[[bytes], None] = self.sent.append
        self._extra = extra
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeLoop:
    """``time()`` from a counter (deterministic, and a C call like uvloop's); no tasks."""

    def __init__(self) -> None:
        self.time: Callable[[], float] = count(1000.0, 0.0001).__next__

    def create_task(self, coro: Any) -> Any:  # only used to connect, which never happens here
        coro.close()
        raise AssertionError("the benchmark pre-opens every upstream connection")


# ``--protection``: what the request path costs with rate limits and ejection bookkeeping on
# (every bucket applies, with rates no request reaches: all pass) against both off.
PROTECTION = {
    "default": "",  # passive health on (the default), no limits
    "off": "health: {passive: {enabled: false}}\n",
    "on": (
        "limits:\n"
        "  per_key: {rate: 10000000, burst: 100000000}\n"
        "  per_group: {rate: 10000000, burst: 100000000}\n"
        "  global: {rate: 10000000, burst: 100000000}\n"
    ),
}


@dataclass
class Bench:
    client: ClientConnection
    client_transport: FakeTransport
    requests: list[bytes]
    ctx: ProxyContext


def setup(shape: str, protection: str = "default") -> Bench:
    topology = TopologyBuilder().build(parse_shard_config(CONFIG + PROTECTION[protection]))
    holder = TopologyHolder(log_changes=False)
    holder.swap(topology)
    ctx = ProxyContext(FakeLoop(), holder, Metrics(), Limits())  # type: ignore[arg-type]
    # One pooled keep-alive connection per pod, as after the first requests of a real load.
    for group in topology.groups.values():
        for pod in group.pods:
            link = ctx.pools.link(pod)
            conn = UpstreamConnection(ctx, link)
            conn.connection_made(FakeTransport({"peername": (pod.host, pod.port)}))  # type: ignore[arg-type]
            now = ctx.loop.time()
            conn.idle_at(now, now + ctx.limits.upstream_idle_timeout)
            link.idle.append(conn)
    client = ClientConnection(ctx)
    transport = FakeTransport({"peername": ("10.244.0.17", 40512)})
    client.connection_made(transport)  # type: ignore[arg-type]
    requests = [request(shape, f"user-{i:05d}") for i in range(KEYS)]
    return Bench(client, transport, requests, ctx)


def drive(bench: Bench, n: int) -> None:
    """``n`` request/response round trips on the bench's client connection."""
    client = bench.client
    exchanges = client.exchanges
    requests = bench.requests
    keys = len(requests)
    response = RESPONSE
    for i in range(n):
        client.data_received(requests[i % keys])
        exchanges[0].upstream.data_received(response)  # type: ignore[union-attr]


def check(bench: Bench) -> None:
    """One round trip, looked at: routed, forwarded, answered, and the connection kept."""
    client, ctx = bench.client, bench.ctx
    before = sum(route.codes[1] for route in ctx.metrics.write_routes.values())
    client.data_received(bench.requests[0])
    exchange = client.exchanges[0]
    conn = exchange.upstream
    assert conn is not None, "the request was not sent upstream"
    sent = conn.transport.sent[-1]  # type: ignore[union-attr]
    assert sent.startswith(b"POST /orders HTTP/1.1\r\n") and sent.endswith(BODY), sent
    assert b"\r\nX-Shard-Group: " + conn.link.group_bytes in sent and b"\r\nVia: 1.1 shardgate" in sent
    conn.data_received(RESPONSE)
    answer = bench.client_transport.sent[-1]
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(RESPONSE_BODY), answer
    assert b"\r\nX-Shard-Group: " in answer and b"Connection" not in answer, answer
    assert not client.exchanges and not client.closed
    assert sum(route.codes[1] for route in ctx.metrics.write_routes.values()) == before + 1


def wall_clock(shape: str, requests: int, repeats: int, protection: str = "default") -> list[float]:
    bench = setup(shape, protection)
    check(bench)
    drive(bench, WARMUP)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        drive(bench, requests)
        runs.append((time.perf_counter() - start) / requests * 1e6)
    check(bench)
    return runs


@dataclass
class Result:
    shape: str
    build: str  # "compiled (N modules)" or "pure Python"
    us_per_request: float | None = None
    runs_us: list[float] | None = None
    instructions_per_request: float | None = None


def build_label() -> str:
    compiled = build.compiled_modules()
    return f"compiled ({len(compiled)} modules)" if compiled else "pure Python"


_TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


def callgrind_instructions(shape: str, requests: int, protection: str = "default") -> float:
    """(Ir(2N) - Ir(N)) / N under callgrind: what one more request costs, in instructions."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (requests, 2 * requests):
            out = Path(tmp) / f"callgrind.{n}"
            subprocess.run(
                [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-m", "bench.dataplane", "--shape", shape, "--requests", str(n), "--once",
                 "--protection", protection],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            found = _TOTALS.search(out.read_bytes())
            assert found, f"no totals in {out}"
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=(*SHAPES, "all"), default="all")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (wall clock)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per request (valgrind)")
    parser.add_argument("--once", action="store_true", help="warm up, run --requests once, print nothing")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--protection",
        choices=tuple(PROTECTION),
        default="default",
        help="off: no ejection bookkeeping, no limits; on: passive health and every rate limit",
    )
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shape == "all" else (args.shape,)
    if args.once:  # what runs under callgrind: the same steps, without timing
        for shape in shapes:
            bench = setup(shape, args.protection)
            check(bench)
            drive(bench, WARMUP)
            drive(bench, args.requests)
        return 0
    label = build_label()
    results = []
    for shape in shapes:
        result = Result(shape, label)
        if args.callgrind:
            result.instructions_per_request = callgrind_instructions(shape, args.requests, args.protection)
        else:
            gc.collect()
            result.runs_us = wall_clock(shape, args.requests, args.repeats, args.protection)
            result.us_per_request = statistics.median(result.runs_us)
        results.append(result)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    for r in results:
        figure = (
            f"{r.instructions_per_request:,.0f} instructions/request"
            if r.instructions_per_request is not None
            else f"{r.us_per_request:.2f} us/request (median of {len(r.runs_us or [])})"
        )
        print(f"{r.shape:8} {r.build:22} {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
