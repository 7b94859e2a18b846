"""Harness for the coordination tests: the API-server double reached through the real client
(one kubeconfig and bearer token per party, so one party can be cut off), backends behind the
real fence on 127.0.0.1, a watch that records every state the ConfigMap held, and a stand-in
for the gateway's own report of the generation it routes on.

Everything waits by polling with a deadline; a deadline is how long a loaded machine may take,
never a speed a test asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.coordination import ReplicaRegistry
from gateway.discovery.kubernetes import CONFIGMAPS, ResourceWatcher, WatchTiming, list_call
from gateway.fence import STATE_PATH, Fence
from gateway.shardstate import STATE_KEY, ShardState, state_configmap_name
from tests.k8s.apiserver import FakeApiServer
from tests.support import contract_ring, poll_until

NS = "shards"
CONFIGMAP = "shardgate"
STATE_CONFIGMAP = state_configmap_name(CONFIGMAP)
KEY_HEADER = "User-ID"
GROUPS = ("g1", "g2", "g3")
SHRUNK = ("g1", "g2")  # g3 removed: only g3 loses keys (ketama keeps g1's and g2's points)
GROWN = ("g1", "g2", "g3", "g4")
# How long a change may take to show on a loaded 2-core machine (typical: well under 1 s).
DEADLINE = 15.0
WATCH_TIMING = WatchTiming(
    watch_timeout=30.0, connect_timeout=1.0, list_timeout=5.0, backoff_initial=0.05, backoff_max=0.5
)
# The coordinator's own periods, shortened (the leader Lease's too).
FAST = {
    "interval": 0.1,
    "stable_interval": 0.5,
    "lease_duration": 2.0,
    "renew_deadline": 1.2,
    "retry_period": 0.2,
    "replica_renew": 0.5,
    "probe_timeout": 1.0,
    "request_timeout": 2.0,
}


# ---------------------------------------------------------------------------------------------
# Configs and keys


def config_text(
    groups: Sequence[str] = GROUPS,
    *,
    lease: float = 1.0,
    timeout: float | None = None,
    hold: float = 2.0,
    mode: str = "fenced",
    endpoints: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A shards.yaml. Groups are Service groups (their pods: whatever ``pods_of`` says) unless
    ``endpoints`` lists their addresses (the file source's way)."""
    document: dict[str, Any] = {
        "version": 1,
        "routing": {"key_header": KEY_HEADER},
        "ring": {"vnodes": 160},
        "handoff": {
            "mode": mode,
            "fence_lease_seconds": lease,
            "barrier_timeout_seconds": timeout if timeout is not None else 3 * lease + 3,
            "hold_seconds": hold,
        },
        "groups": [
            {"name": g, "endpoints": list(endpoints[g])}
            if endpoints is not None
            else {"name": g, "service": g}
            for g in groups
        ],
    }
    return yaml.safe_dump(document, sort_keys=False)


def owner(groups: Sequence[str], key: str) -> str:
    return str(contract_ring({g: 1 for g in groups}, 160).get_node(key))


def moving_key(before: Sequence[str], after: Sequence[str], source: str) -> str:
    """A key ``source`` owns under ``before`` and another group under ``after``."""
    for i in range(100_000):
        key = f"user-{i}"
        if owner(before, key) == source and owner(after, key) != source:
            return key
    raise AssertionError("no key moves")


# ---------------------------------------------------------------------------------------------
# Running and waiting


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 120.0) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout))


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = DEADLINE, interval: float = 0.02
) -> bool:
    """``poll_until`` with this suite's deadline."""
    return await poll_until(check, timeout, interval)


# ---------------------------------------------------------------------------------------------
# The API server and its clients


class Kube:
    """Per-party clients of the double: ``factory(token)`` is an ``api_factory`` whose requests
    carry ``token`` (accepted by the double), so ``api.cut_off(token)`` partitions that party."""

    def __init__(self, api: FakeApiServer, directory: Path) -> None:
        self.api = api
        self.directory = directory

    def factory(self, token: str) -> Callable[[], Any]:
        from kubernetes import config as kube_config

        self.api.add_token(token)
        path = self.api.kubeconfig(self.directory / token / "kubeconfig", namespace=NS, token=token)
        return lambda: kube_config.new_client_from_config(config_file=str(path))


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def kube(api: FakeApiServer, tmp_path: Path) -> Kube:
    return Kube(api, tmp_path)


def state_of(api: FakeApiServer) -> ShardState | None:
    """The stored state (read from the double's store directly)."""
    obj = api.get_object("configmaps", NS, STATE_CONFIGMAP)
    if obj is None or STATE_KEY not in (obj.get("data") or {}):
        return None
    return ShardState.from_json(obj["data"][STATE_KEY])


class StateHistory:
    """Every version the state ConfigMap held, in order, as a real list-then-watch sees them
    (started before the first write, it misses none: the watch resumes from the list)."""

    def __init__(self, api_factory: Callable[[], Any]) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.states: list[ShardState] = []
        self._watcher = ResourceWatcher(
            "state-history",
            list_call(api_factory(), CONFIGMAPS),
            {"namespace": NS, "field_selector": f"metadata.name={STATE_CONFIGMAP}"},
            self._items,
            WATCH_TIMING,
        )

    def _items(self, items: dict[str, Any]) -> None:
        obj = items.get(STATE_CONFIGMAP)
        if obj is None:
            return
        version = obj["metadata"]["resourceVersion"]
        text = (obj.get("data") or {}).get(STATE_KEY)
        with self._lock:
            if version not in self._seen and text is not None:
                self._seen.add(version)
                self.states.append(ShardState.from_json(text))

    def __enter__(self) -> StateHistory:
        self._watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._watcher.stop()

    def snapshot(self) -> list[ShardState]:
        with self._lock:
            return list(self.states)

    def generations(self) -> list[int]:
        return [s.generation for s in self.snapshot()]


def assert_linear(states: Sequence[ShardState]) -> None:
    """One history: generations 1, 2, 3 ... each once, and every step one the protocol makes."""
    assert [s.generation for s in states] == list(range(1, len(states) + 1)), [
        (s.generation, s.phase, s.leader) for s in states
    ]
    for before, after in itertools.pairwise(states):
        if after.phase == "fencing":
            assert before.phase == "stable" and after.config == before.config, (before, after)
        elif before.phase == "fencing":
            assert after.config in (before.config, before.next), (before, after)
        else:
            assert after.outcome == "committed (no key moves)", (before, after)


@contextlib.asynccontextmanager
async def reporting_as_gateway(api: FakeApiServer, registry: ReplicaRegistry | None) -> AsyncIterator[None]:
    """Stand in for the gateway of the coordinator's replica: report the stored generation with
    no write in flight (the gateway's router will feed ``registry.report`` itself)."""

    async def follow() -> None:
        while True:
            state = state_of(api)
            if state is not None and registry is not None:
                registry.report(state.generation, 0)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(follow())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    """One backend pod on 127.0.0.1: its fence (if any), and what reached it."""

    group: str
    address: str
    fence: Fence | None
    session: aiohttp.ClientSession
    probes: list[str | None] = field(default_factory=list)  # ?generation= of each fence request
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # key -> released when set
    entered: dict[str, asyncio.Event] = field(default_factory=dict)  # key -> its handler runs

    def gate(self, key: str) -> asyncio.Event:
        """Writes for ``key`` wait in the handler until the returned event is set."""
        self.entered[key] = asyncio.Event()
        self.gates[key] = asyncio.Event()
        return self.gates[key]

    async def write(self, key: str) -> tuple[int, Any]:
        async with self.session.post(f"http://{self.address}/orders", headers={KEY_HEADER: key}) as resp:
            body = await resp.read()
            with contextlib.suppress(ValueError):
                return resp.status, json.loads(body)
            return resp.status, None

    async def fence_state(self) -> dict[str, Any]:
        async with self.session.get(f"http://{self.address}{STATE_PATH}") as resp:
            document = await resp.json()
            assert isinstance(document, dict)
            return document

    def probes_of(self, generation: int) -> int:
        return sum(1 for p in self.probes if p == str(generation))


@contextlib.asynccontextmanager
async def serve_backend(
    group: str, fence: Fence | None = None, *, status: int = 200, document: Mapping[str, Any] | None = None
) -> AsyncIterator[Backend]:
    """An aiohttp backend, behind ``fence`` if given. Without one it answers every request
    itself (``status``, ``document``): a pod that runs no fence."""
    app = web.Application()
    holder: list[Backend] = []

    async def handler(request: web.Request) -> web.Response:
        backend = holder[0]
        key = request.headers.get(KEY_HEADER) or ""
        if request.method == "POST" and key in backend.gates:
            backend.entered[key].set()
            await backend.gates[key].wait()
        return web.json_response(dict(document or {"handled": True}), status=status)

    @web.middleware
    async def count_probes(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == STATE_PATH:
            holder[0].probes.append(request.query.get("generation"))
        response: web.StreamResponse = await handler(request)
        return response

    app.router.add_route("*", "/{tail:.*}", handler)
    if fence is not None:
        fence.install(app)
    app.middlewares.insert(0, count_probes)  # outermost: sees the fence's own answers too
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession() as session:
            holder.append(Backend(group, f"127.0.0.1:{port}", fence, session))
            yield holder[0]
    finally:
        for gate in holder[0].gates.values() if holder else ():
            gate.set()
        await runner.cleanup()


def configmap_fence(kube: Kube, group: str, pod: str) -> Fence:
    return Fence.from_configmap(
        CONFIGMAP,
        namespace=NS,
        group=group,
        api_factory=kube.factory(f"fence-{pod}"),
        watch_timing=WATCH_TIMING,
        pod=pod,
    )


def silent_address() -> str:
    """An address nothing answers on (a port that was free a moment ago: connections refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An address that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


class Desired:
    """The desired config as the gateway's discovery would hold it."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        self.listeners: list[Callable[[], None]] = []

    def __call__(self) -> str | None:
        return self.text

    def set(self, text: str | None) -> None:
        self.text = text
        for listener in self.listeners:
            listener()


class Pods:
    """The gateway's discovery view: group -> pod addresses, whatever their state."""

    def __init__(self, by_group: Mapping[str, Iterable[str]] | None = None) -> None:
        self.by_group = {g: list(a) for g, a in (by_group or {}).items()}

    def __call__(self, group: str) -> list[str]:
        return list(self.by_group.get(group, ()))
