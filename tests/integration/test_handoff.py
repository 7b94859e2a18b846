"""A config change that moves keys, handed off by a real gateway process (a file source: the
process is its own leader) in front of real fenced backends (aiohttp apps with
``Fence.from_file`` on the gateway's state file): the fence phase, the barrier waiting for a
write in flight for a moving key, the commit (docs/design/014-ownership-handoff.md)."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.fence import Fence
from gateway.shardstate import Phase, ShardState
from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    http_request,
    render_config,
)
from tests.integration.upstream import wait_until
from tests.support import BackgroundAiohttp

pytestmark = pytest.mark.timeout(90)


@dataclass
class FencedBackend:
    """One pod of a group: a fenced aiohttp app whose ``POST /w`` records the key it wrote; a
    key in ``blocked`` waits (in the handler, after the fence accepted it) until released."""

    group: str
    state_path: Path
    accepted: list[str] = field(default_factory=list)
    blocked: dict[str, threading.Event] = field(default_factory=dict)
    server: BackgroundAiohttp | None = None

    def start(self) -> FencedBackend:
        self.server = BackgroundAiohttp(self._app, name=f"backend-{self.group}")
        self.server.start()
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/w", self._write)
        fence = Fence.from_file(
            "unused", group=self.group, state_path=str(self.state_path), poll_interval=0.1
        )
        fence.install(app)
        return app

    async def _write(self, request: web.Request) -> web.Response:
        key = request.headers[KEY_HEADER]
        self.accepted.append(key)
        gate = self.blocked.get(key)
        if gate is not None:
            await asyncio.to_thread(gate.wait, 30)
        return web.json_response({"group": self.group, "key": key})

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[dict[str, FencedBackend]]:
    state = tmp_path / "shards.state"
    started = {name: FencedBackend(name, state).start() for name in ("g1", "g2", "g3")}
    yield started
    for backend in started.values():
        for gate in backend.blocked.values():
            gate.set()
        backend.stop()


def write(gw: Gateway, key: str, timeout: float = 20.0) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    try:
        result = http_request(conn, "POST", "/w", {KEY_HEADER: key}, b"{}")
        return result.status, {k.lower(): v for k, v in result.headers}, result.json()
    finally:
        conn.close()


def handoff(gw: Gateway) -> dict[str, Any]:
    described: dict[str, Any] = gw.debug_ring()["config"]["handoff"]
    return described


def test_a_hand_off_fences_the_moving_keys_waits_for_their_writes_then_switches(
    start_gateway: GatewayFactory, backends: dict[str, FencedBackend], tmp_path: Path
) -> None:
    before = [GroupSpec(name, (backends[name].address,)) for name in ("g1", "g2")]
    after = [*before, GroupSpec("g3", (backends["g3"].address,))]
    old, new = Recipe(before), Recipe(after)
    keys = [f"user-{i}" for i in range(200)]
    moving = [k for k in keys if old.owner(k) != new.owner(k)]
    staying = [k for k in keys if old.owner(k) == new.owner(k)]
    assert moving and staying
    in_flight, refused = moving[0], moving[1]
    state_path = tmp_path / "shards.state"
    gw = start_gateway(before, env={"SHARDGATE_STATE_FILE": str(state_path)})

    # Generation 1, written by the gateway at start; the fences follow it and accept writes.
    assert ShardState.from_json(state_path.read_text()).generation == 1
    assert wait_until(lambda: write(gw, staying[0])[0] == 200, 10)
    for key in keys[:40]:
        status, headers, body = write(gw, key)
        assert (status, body["group"]) == (200, old.owner(key)), (key, status, body)

    # A write for a key about to move is running at its old owner when the config changes.
    source = backends[old.owner(in_flight)]
    source.blocked[in_flight] = threading.Event()
    running: list[tuple[int, dict[str, str], Any]] = []
    writer = threading.Thread(target=lambda: running.append(write(gw, in_flight, timeout=60)))
    writer.start()
    assert wait_until(lambda: in_flight in source.accepted, 10)

    gw.write_config(render_config(after))
    assert wait_until(lambda: handoff(gw)["phase"] == "fencing", 15), handoff(gw)
    assert wait_until(lambda: gw.debug_ring()["config"]["generation"] == 2, 10)
    described = handoff(gw)
    assert described["moving_share"] and 0.15 < described["moving_share"] < 0.5, described
    # The fence phase: a moving key belongs to nobody, the others route as before.
    status, headers, body = write(gw, refused)
    assert (status, body["error"], headers.get("retry-after")) == (503, "shard_moving", "1"), body
    assert refused not in backends[new.owner(refused)].accepted
    for key in staying[:20]:
        status, _, body = write(gw, key)
        assert (status, body["group"]) == (200, old.owner(key)), (key, status, body)
    # The barrier waits for the old owner's pod, which still runs a write for a moving key.
    assert wait_until(lambda: f"pod:{source.address}" in handoff(gw)["waiting_for"], 10), handoff(gw)
    assert handoff(gw)["phase"] == "fencing"

    source.blocked[in_flight].set()
    writer.join(30)
    assert running and running[0][0] == 200 and running[0][2]["group"] == old.owner(in_flight)
    assert wait_until(lambda: handoff(gw)["phase"] == "stable", 15), handoff(gw)
    assert wait_until(lambda: gw.debug_ring()["config"]["generation"] == 3, 10)
    committed = ShardState.from_json(state_path.read_text())
    assert (committed.generation, committed.phase) == (3, Phase.STABLE)
    assert committed.outcome is not None and committed.outcome.startswith("committed")
    assert handoff(gw)["barrier_held_by"] == "reports"
    assert gw.metric("shardgate_handoffs_total", outcome="committed") == 1
    assert gw.metric("shardgate_handoffs_total", outcome="rolled_back") == 0
    assert gw.metric("shardgate_handoff_fence_seconds_total") > 0  # the barrier waited for a write
    assert gw.metric("shardgate_handoff_fencing") == 0
    assert gw.metric("shardgate_shard_state_generation") == 3

    # After the switch every key goes to its new owner, whose fence accepts it.
    for key in [*moving[:10], *staying[:10]]:
        status, _, body = write(gw, key)
        assert (status, body["group"]) == (200, new.owner(key)), (key, status, body)
    assert all(new.owner(k) == "g3" for k in moving)  # (adding a group moves keys only to it)
    assert set(moving[:10]) <= set(backends["g3"].accepted)
