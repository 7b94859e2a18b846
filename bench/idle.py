"""Memory of a proxy holding many idle keep-alive client connections.

`measure_idle` opens N TCP connections to a proxy (at most `CONNECT_CONCURRENCY` handshakes in
flight, so that no listen backlog overflows), sends one keep-alive request on each (an
Ingress-shaped POST, as the throughput runs send) and reads its response, keeps them all open
and reads VmRSS/VmHWM of the serving process(es) from /proc. Just
before the connections are opened the kernel's peak-RSS mark is reset (`5` into
/proc/PID/clear_refs), so that VmHWM is the peak *during* this measurement, not of the whole
benchmark run. At the end every connection is reset (SO_LINGER 0): no TIME_WAIT sockets pile up
between systems.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.shapes import request

CONNECT_CONCURRENCY = 128
EXCHANGE_TIMEOUT_S = 10.0
SETTLE_S = 0.5  # after the last response, before /proc is read
MAX_ERROR_SAMPLES = 5


@dataclass
class IdleResult:
    wanted: int  # connections the measurement tried to open
    opened: int  # connections whose request got a complete 2xx response
    still_open: int  # of those, still open when the memory was read
    failed: int  # connect/request/response failures and non-2xx answers
    pids: list[int]
    rss_before_kb: int | None  # VmRSS (summed over pids) before the connections were opened
    rss_kb: int | None  # VmRSS with the connections open
    hwm_kb: int | None  # VmHWM: peak since the reset (since process start if hwm_reset is False)
    hwm_reset: bool
    open_s: float  # how long opening all connections took
    error_samples: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.failed + (self.opened - self.still_open)

    @property
    def peak_kb(self) -> int | None:
        """The peak RSS of this measurement: VmHWM if it was reset, else VmRSS at N connections."""
        return self.hwm_kb if self.hwm_reset else self.rss_kb

    @property
    def per_connection_kb(self) -> float | None:
        if self.rss_kb is None or self.rss_before_kb is None or not self.still_open:
            return None
        return (self.rss_kb - self.rss_before_kb) / self.still_open

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(errors=self.errors, peak_kb=self.peak_kb, per_connection_kb=self.per_connection_kb)
        return data


def read_status_kb(pid: int, fields: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Selected `kB` fields of /proc/PID/status (empty if the process is gone)."""
    wanted = set(fields)
    found: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            found[name] = int(value.split()[0])
    return found


def _sum_field(pids: Sequence[int], name: str) -> int | None:
    values = [read_status_kb(pid).get(name) for pid in pids]
    if not values or any(value is None for value in values):
        return None
    return sum(value for value in values if value is not None)


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user or root); False if not possible."""
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return bool(pids)


def _response_complete(data: bytes) -> tuple[bool, int]:
    """(complete, status) for a buffered response with a Content-Length (or none: empty body)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False, 0
    head = data[:head_end].decode("latin-1")
    status_line, *lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return len(data) >= head_end + 4 + length, status


async def _open_one(
    loop: asyncio.AbstractEventLoop, address: tuple[str, int], request: bytes
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, request)
        data = b""
        while True:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionError("closed before the response was complete")
            data += chunk
            complete, status = _response_complete(data)
            if complete:
                if not 200 <= status < 300:
                    raise ConnectionError(f"status {status}")
                return sock
    except BaseException:
        _reset(sock)
        raise


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _count_open(sockets: Sequence[socket.socket]) -> int:
    """Connections the proxy has not closed: not readable, or readable without EOF."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLRDHUP | select.POLLHUP)
    closed = 0
    for fd, _ in poller.poll(0):
        try:
            if by_fd[fd].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return len(by_fd) - closed


async def _open_all(
    address: tuple[str, int], count: int, path: str, shape: str
) -> tuple[list[socket.socket], list[str], int]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int) -> socket.socket:
        async with gate:
            return await asyncio.wait_for(
                _open_one(loop, address, request(shape, index, path)), EXCHANGE_TIMEOUT_S
            )

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    sockets = [item for item in results if isinstance(item, socket.socket)]
    errors = [f"{type(item).__name__}: {item}" for item in results if isinstance(item, BaseException)]
    return sockets, errors[:MAX_ERROR_SAMPLES], len(errors)


def measure_idle(
    address: tuple[str, int], pids: Sequence[int], count: int, path: str, shape: str = "ingress"
) -> IdleResult:
    """Open `count` idle keep-alive connections to `address` and read the memory of `pids`.

    Each connection first sends request number i of `shape` (bench/shapes.py) to `path`.
    """
    hwm_reset = reset_peak_rss(pids)
    rss_before = _sum_field(pids, "VmRSS")
    start = time.monotonic()
    sockets, samples, failed = asyncio.run(_open_all(address, count, path, shape))
    open_s = time.monotonic() - start
    try:
        time.sleep(SETTLE_S)
        rss = _sum_field(pids, "VmRSS")
        hwm = _sum_field(pids, "VmHWM")
        still_open = _count_open(sockets)
    finally:
        for sock in sockets:
            _reset(sock)
    return IdleResult(
        wanted=count,
        opened=len(sockets),
        still_open=still_open,
        failed=failed,
        pids=list(pids),
        rss_before_kb=rss_before,
        rss_kb=rss,
        hwm_kb=hwm,
        hwm_reset=hwm_reset,
        open_s=round(open_s, 2),
        error_samples=samples,
    )
