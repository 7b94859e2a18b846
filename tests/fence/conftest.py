"""Harness for the fence's tests: shard configs and states, the contract's ring recipe, backend
applications (aiohttp, ASGI) served on real sockets, and an HTTP client.

Everything waits by polling with a deadline; a deadline is how long a loaded machine may take,
never a speed the test asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.fence import STATE_PATH, Fence
from gateway.shardstate import Phase, ShardState
from tests.k8s.apiserver import FakeApiServer
from tests.support import contract_ring, poll_until

KEY_HEADER = "User-ID"
OWN = "group-2"  # the group of the backend under test
GROUPS = ("group-1", "group-2", "group-3")
GROWN = (*GROUPS, "group-4")  # a group added: some keys move to group-4
NS = "shards"
CONFIGMAP = "shardgate-shards"
# How long a change may take to show on a loaded 2-core machine (typical: well under 0.5 s).
DEADLINE = 10.0


# ---------------------------------------------------------------------------------------------
# Configs, states and the ring recipe


def config_text(
    groups: Sequence[str] = GROUPS,
    *,
    weights: Mapping[str, int] | None = None,
    lease: float | None = None,
    key_header: str = KEY_HEADER,
    write_methods: Sequence[str] | None = None,
    vnodes: int = 160,
) -> str:
    """A shards.yaml with fixed endpoints (one address per group, derived from its name)."""
    routing: dict[str, Any] = {"key_header": key_header}
    if write_methods is not None:
        routing["write_methods"] = list(write_methods)
    document: dict[str, Any] = {"version": 1, "routing": routing, "ring": {"vnodes": vnodes}}
    if lease is not None:
        document["handoff"] = {"fence_lease_seconds": lease, "barrier_timeout_seconds": 3 * lease + 1}
    document["groups"] = [
        {
            "name": g,
            "weight": (weights or {}).get(g, 1),
            "endpoints": [f"10.0.{sum(g.encode()) % 250}.1:8080"],
        }
        for g in groups
    ]
    return yaml.safe_dump(document, sort_keys=False)


def stable(generation: int, config: str) -> ShardState:
    return ShardState(generation=generation, phase=Phase.STABLE, config=config, since=time.time())


def fencing(generation: int, config: str, next_config: str) -> ShardState:
    return ShardState(
        generation=generation,
        phase=Phase.FENCING,
        config=config,
        next=next_config,
        since=time.time(),
        deadline=time.time() + 90,
    )


class Recipe:
    """owner(K) as the contract spells it (uhashring ketama over the groups)."""

    def __init__(self, groups: Sequence[str], weights: Mapping[str, int] | None = None) -> None:
        self._ring = contract_ring({g: (weights or {}).get(g, 1) for g in groups})

    def owner(self, key: str) -> str:
        return str(self._ring.get_node(key.strip(" \t")))


BEFORE, AFTER = Recipe(GROUPS), Recipe(GROWN)


def find_keys(predicate: Callable[[str], bool], count: int = 1, prefix: str = "user") -> list[str]:
    keys = [f"{prefix}-{i}" for i in range(100_000) if predicate(f"{prefix}-{i}")][:count]
    assert len(keys) == count, "not enough keys match"
    return keys


def key_of(group: str) -> str:
    """A key ``group`` owns before and after group-4 is added (it never moves)."""
    return find_keys(lambda k: BEFORE.owner(k) == group and AFTER.owner(k) == group)[0]


def moving_key(source: str = OWN, target: str = "group-4") -> str:
    """A key that moves from ``source`` to ``target`` when group-4 is added."""
    return find_keys(lambda k: BEFORE.owner(k) == source and AFTER.owner(k) == target)[0]


def write_state(path: Path, state: ShardState | str) -> None:
    """Replace the state file at once (rename), as a leader writing it would."""
    text = state if isinstance(state, str) else state.to_json()
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def put_state(api: FakeApiServer, state: ShardState | str, name: str = CONFIGMAP) -> None:
    text = state if isinstance(state, str) else state.to_json()
    api.put_configmap(NS, f"{name}-state", {"state.json": text})


# ---------------------------------------------------------------------------------------------
# Running async tests and waiting


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 90.0) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout))


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = DEADLINE, interval: float = 0.02
) -> bool:
    """``poll_until`` with this suite's deadline."""
    return await poll_until(check, timeout, interval)


# ---------------------------------------------------------------------------------------------
# Talking to a backend


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the JSON document, or None
    headers: CIMultiDict[str]  # case-insensitive, as field names are

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


class Client:
    """A real aiohttp client for one backend at 127.0.0.1:port."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    async def request(
        self,
        method: str,
        key: str | None,
        path: str = "/orders",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        fields = [(KEY_HEADER, key)] if key is not None else []
        fields += list(headers)
        body = b'{"item": 1}' if method in ("POST", "PUT", "PATCH") else None
        async with self.session.request(method, self.base + path, headers=fields, data=body) as resp:
            data = await resp.read()
            document: Any = None
            with contextlib.suppress(ValueError):
                document = json.loads(data)
            return Reply(resp.status, document, CIMultiDict(resp.headers))

    async def write(self, key: str | None, **kwargs: Any) -> Reply:
        return await self.request("POST", key, **kwargs)

    async def read(self, key: str | None, **kwargs: Any) -> Reply:
        return await self.request("GET", key, **kwargs)

    async def state(self, generation: int | None = None) -> dict[str, Any]:
        query = f"?generation={generation}" if generation is not None else ""
        async with self.session.get(self.base + STATE_PATH + query) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            assert resp.headers["X-Shard-Fence"] == "state"
            document = await resp.json()
            assert isinstance(document, dict)
            return document

    async def until_state(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the state endpoint until ``predicate`` holds; the matching document."""
        seen: list[dict[str, Any]] = []

        async def check() -> bool:
            seen.append(await self.state())
            return predicate(seen[-1])

        assert await eventually(check), f"the fence never got there; last state: {seen[-1] if seen else None}"
        return seen[-1]


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, Any]]:
    """Send one request head as raw bytes (for field values no client library sends)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body)


def raw_write_head(key: bytes, extra: bytes = b"") -> bytes:
    """A POST whose key field is ``key`` as raw bytes; ``extra``: more field lines (CRLF each)."""
    return (
        b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n"
        + KEY_HEADER.encode()
        + b": "
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


# ---------------------------------------------------------------------------------------------
# The backend application: records what reached it; a key can be made to wait


@dataclass
class Calls:
    """What reached the application behind the fence, and keys whose writes wait for a gate."""

    seen: list[tuple[str, str | None]] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)

    async def handle(self, method: str, key: str | None) -> None:
        self.seen.append((method, key))
        gate = self.gates.get(key or "")
        if gate is not None and method != "GET":
            await asyncio.to_thread(gate.wait, DEADLINE * 3)

    def reached(self, method: str, key: str | None) -> bool:
        return (method, key) in self.seen


def aiohttp_app(calls: Calls) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        key = request.headers.get(KEY_HEADER)
        await calls.handle(request.method, key)
        return web.json_response({"handled": True, "key": key})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@contextlib.asynccontextmanager
async def serve_aiohttp(fence: Fence, calls: Calls) -> AsyncIterator[Client]:
    """``fence.install`` on a recording app, served by AppRunner/TCPSite on a free port."""
    app = aiohttp_app(calls)
    fence.install(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession() as session:
            yield Client(session, port)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# uvicorn on a thread


class UvicornThread:
    """A real uvicorn server for an ASGI app, on a pre-bound socket, in a thread."""

    def __init__(self, app: Any, lifespan: str = "on") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True
        )

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + DEADLINE
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    return api.kubeconfig(tmp_path / "kubeconfig", namespace=NS)


@pytest.fixture
def api_factory(kubeconfig: Path) -> Callable[[], Any]:
    from kubernetes import config as kube_config

    return lambda: kube_config.new_client_from_config(config_file=str(kubeconfig))
