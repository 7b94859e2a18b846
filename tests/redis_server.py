"""A real ``redis-server`` (Debian package) on a free 127.0.0.1 port, for the rate-limit tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support import free_port, require_tool


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw reply (enough for PING, FLUSHALL, DBSIZE)."""
        request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(request)
            return conn.recv(65536)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def start_redis(port: int | None = None) -> RedisServer:
    binary = require_tool("redis-server")
    port = port or free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, process)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            if server.command("PING").startswith(b"+PONG"):
                return server
        if process.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"redis-server did not start on port {port}")
        time.sleep(0.02)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.kill()
