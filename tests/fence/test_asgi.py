"""``fence.wrap(app)`` under a real uvicorn server (a thread, a pre-bound socket), with a real
aiohttp client: FastAPI with its own lifespan, and raw ASGI apps that do not speak lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.fence import Fence
from tests.fence.conftest import (
    GROWN,
    KEY_HEADER,
    OWN,
    Calls,
    Client,
    UvicornThread,
    config_text,
    fencing,
    key_of,
    moving_key,
    raw_request,
    raw_write_head,
    run,
    stable,
    write_state,
)


def fastapi_app(calls: Calls, events: list[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/orders", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def orders(request: Request) -> JSONResponse:
        key = request.headers.get(KEY_HEADER)
        await calls.handle(request.method, key)
        return JSONResponse({"handled": True, "key": key})

    return app


def raising_on_lifespan(calls: Calls) -> Callable[..., Any]:
    """A bare ASGI app that only knows ``http`` (raises on anything else, as many do)."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        assert scope["type"] == "http", f"unsupported scope {scope['type']}"
        await _bare_http(calls, scope, send)

    return app


def returning_on_lifespan(calls: Calls) -> Callable[..., Any]:
    """A bare ASGI app that returns at once on a scope it does not know."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            await _bare_http(calls, scope, send)

    return app


async def _bare_http(calls: Calls, scope: dict[str, Any], send: Callable[..., Any]) -> None:
    fields = dict(scope["headers"])
    key = fields.get(KEY_HEADER.lower().encode())
    await calls.handle(scope["method"], key.decode() if key is not None else None)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b'{"handled": true}'})


def file_fence(tmp_path: Path) -> tuple[Fence, Path]:
    fence = Fence.from_file(str(tmp_path / "shards.yaml"), group=OWN, poll_interval=0.05)
    return fence, tmp_path / "shards.yaml.state"


async def with_client(port: int, body: Callable[[Client], Any]) -> None:
    async with aiohttp.ClientSession() as session:
        await body(Client(session, port))


def test_fastapi_behind_the_fence_under_uvicorn(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    moving, staying, other = moving_key(OWN, "group-4"), key_of(OWN), key_of("group-1")
    calls, events = Calls(gates={moving: threading.Event()}), []
    app = fence.wrap(fastapi_app(calls, events))

    async def scenario(client: Client) -> None:
        state = await client.until_state(lambda s: s["generation"] == 1 and s["confirmed"])
        assert (await client.write(staying)).status == 200
        refused = await client.write(other, headers=[("X-Request-ID", "abc-1")])
        assert (refused.status, refused.error, refused.body["owner"]) == (421, "misdirected_write", "group-1")
        assert (refused.body["epoch"], refused.body["generation"], refused.body["request_id"]) == (
            state["epoch"],
            1,
            "abc-1",
        )
        assert refused.headers["X-Shard-Fence"] == "misdirected_write"
        assert refused.headers["X-Request-ID"] == "abc-1"
        assert refused.headers["Content-Type"] == "application/json"
        assert not calls.reached("POST", other)
        assert (await client.read(other)).status == 200 and calls.reached("GET", other)
        assert (await client.write(None)).error == "missing_shard_key"
        assert (await client.write(staying, headers=[(KEY_HEADER, staying)])).error == "invalid_shard_key"
        status, body = await raw_request(client.port, raw_write_head(staying.encode(), b"user-id: other\r\n"))
        assert (status, body["error"]) == (400, "invalid_shard_key")  # one field, whatever its case
        status, body = await raw_request(client.port, raw_write_head(b"\xff\xfe"))
        assert (status, body["error"]) == (400, "invalid_shard_key")

        # a write in flight while the state moves its key
        write = asyncio.create_task(client.write(moving))
        await client.until_state(lambda s: s["writes_in_flight"] == 1)
        write_state(state_file, fencing(2, config_text(), config_text(GROWN)))
        state = await client.until_state(lambda s: s["generation"] == 2)
        assert (state["phase"], state["moving_writes_in_flight"]) == ("fencing", 1)
        again = await client.write(moving)
        assert (again.status, again.error, again.body["owner"]) == (421, "shard_moving", "group-4")
        assert again.headers["Retry-After"] == "1"
        calls.gates[moving].set()
        assert (await write).status == 200
        state = await client.until_state(lambda s: s["writes_in_flight"] == 0)
        assert state["moving_writes_in_flight"] == 0 and state["accepted"] == 2

    assert not fence.running
    with UvicornThread(app) as server:
        assert fence.running and events == ["startup"]
        asyncio.run(asyncio.wait_for(with_client(server.port, scenario), 60))
    assert not fence.running, "the lifespan's shutdown did not stop the fence"
    assert events == ["startup", "shutdown"]


@pytest.mark.parametrize("inner", [raising_on_lifespan, returning_on_lifespan], ids=["raises", "returns"])
def test_an_app_without_lifespan_support_still_gets_a_fence(
    tmp_path: Path, inner: Callable[[Calls], Callable[..., Any]]
) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    calls = Calls()
    own, other = key_of(OWN), key_of("group-3")

    async def scenario(client: Client) -> None:
        await client.until_state(lambda s: s["generation"] == 1 and s["confirmed"])
        assert (await client.write(own)).status == 200
        assert (await client.write(other)).error == "misdirected_write"
        assert calls.seen == [("POST", own)]

    with UvicornThread(fence.wrap(inner(calls))) as server:  # lifespan "on": it must complete
        assert fence.running
        asyncio.run(asyncio.wait_for(with_client(server.port, scenario), 60))
    assert not fence.running


def test_writes_before_the_first_state_under_uvicorn(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    calls = Calls()
    own = key_of(OWN)

    async def scenario(client: Client) -> None:
        assert (await client.state())["generation"] is None
        refused = await client.write(own)
        assert (refused.status, refused.error, refused.headers.get("Retry-After")) == (
            503,
            "shard_state_unconfirmed",
            "1",
        )
        assert (await client.read(own)).status == 200
        write_state(state_file, stable(1, config_text()))
        await client.until_state(lambda s: s["generation"] == 1 and s["confirmed"])
        assert (await client.write(own)).status == 200
        assert calls.seen == [("GET", own), ("POST", own)]

    with UvicornThread(fence.wrap(returning_on_lifespan(calls))) as server:
        asyncio.run(asyncio.wait_for(with_client(server.port, scenario), 60))


def test_generation_query_reads_the_file_at_once(tmp_path: Path) -> None:
    fence = Fence.from_file(str(tmp_path / "shards.yaml"), group=OWN, poll_interval=3600)
    state_file = tmp_path / "shards.yaml.state"
    write_state(state_file, stable(1, config_text()))

    async def scenario(client: Client) -> None:
        await client.until_state(lambda s: s["generation"] == 1 and s["confirmed"])  # the first read
        write_state(state_file, stable(2, config_text(GROWN)))
        assert (await client.state())["generation"] == 1  # no poll for an hour
        assert (await client.state(generation=1))["generation"] == 1  # not above the held one
        state = await client.state(generation=2)
        assert (state["generation"], state["confirmed"]) == (2, True)
        async with client.session.get(client.base + "/.well-known/shardgate/fence?generation=x") as resp:
            assert (resp.status, resp.headers["X-Shard-Fence"]) == (400, "bad_request")

    with UvicornThread(fence.wrap(returning_on_lifespan(Calls()))) as server:
        asyncio.run(asyncio.wait_for(with_client(server.port, scenario), 60))


def test_start_and_stop_are_idempotent(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    wrapped = fence.wrap(returning_on_lifespan(Calls()))
    assert wrapped.fence is fence and not fence.running

    async def scenario() -> None:
        await fence.start()
        await fence.start()  # idempotent
        assert fence.running
        await fence.stop()
        await fence.stop()
        assert not fence.running

    run(scenario)


async def lifespan_exchange(app: Any) -> list[dict[str, Any]]:
    """Drive one lifespan run of ``app`` as a server does; the messages it sent back."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            inbox.put_nowait({"type": "lifespan.shutdown"})

    inbox.put_nowait({"type": "lifespan.startup"})
    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
    return sent


def test_a_fence_that_cannot_start_fails_the_startup(tmp_path: Path) -> None:
    def no_credentials() -> Any:
        raise RuntimeError("no kubernetes credentials here")

    def fence() -> Fence:
        return Fence.from_configmap("shards", namespace="ns", group=OWN, api_factory=no_credentials)

    async def scenario() -> None:
        events: list[str] = []
        for inner in (fastapi_app(Calls(), events), returning_on_lifespan(Calls())):
            sent = await lifespan_exchange(fence().wrap(inner))
            assert [m["type"] for m in sent] == ["lifespan.startup.failed"], sent
            assert "no kubernetes credentials here" in sent[0]["message"]
        assert events == ["startup", "shutdown"]  # the app could release what it had started

        events.clear()
        working = Fence.from_file(str(tmp_path / "shards.yaml"), group=OWN)
        sent = await lifespan_exchange(working.wrap(fastapi_app(Calls(), events)))
        assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert not working.running and events == ["startup", "shutdown"]

    run(scenario)
