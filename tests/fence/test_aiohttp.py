"""``Fence.from_file(...).install(app)`` on a real aiohttp server, with a real aiohttp client:
what reaches the handler, the answers, the state endpoint, new and stale state files, a write
in flight while its key starts moving, and the lease of a file that cannot be read."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from gateway.fence import Fence
from tests.fence.conftest import (
    GROWN,
    KEY_HEADER,
    OWN,
    Calls,
    Client,
    config_text,
    eventually,
    fencing,
    key_of,
    moving_key,
    raw_request,
    raw_write_head,
    run,
    serve_aiohttp,
    stable,
    write_state,
)


def file_fence(tmp_path: Path, poll_interval: float = 0.05) -> tuple[Fence, Path]:
    """A fence on the state file of ``tmp_path/shards.yaml`` (its default name)."""
    fence = Fence.from_file(str(tmp_path / "shards.yaml"), group=OWN, poll_interval=poll_interval)
    return fence, tmp_path / "shards.yaml.state"


async def confirmed_at(client: Client, generation: int) -> dict[str, object]:
    return await client.until_state(lambda s: s["generation"] == generation and s["confirmed"])


def test_writes_are_judged_before_the_handler(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    calls = Calls()
    own, other = key_of(OWN), key_of("group-3")

    async def scenario() -> None:
        async with serve_aiohttp(fence, calls) as client:
            state = await confirmed_at(client, 1)
            accepted = await client.write(own)
            assert accepted.status == 200 and accepted.body == {"handled": True, "key": own}
            assert "X-Shard-Fence" not in accepted.headers

            refused = await client.write(other, headers=[("X-Request-ID", "req-42")])
            assert refused.status == 421
            assert refused.body == {
                "error": "misdirected_write",
                "detail": refused.body["detail"],
                "owner": "group-3",
                "epoch": state["epoch"],
                "generation": 1,
                "request_id": "req-42",
            }
            assert refused.headers["X-Shard-Fence"] == "misdirected_write"
            assert refused.headers["Content-Type"] == "application/json"
            assert refused.headers["X-Request-ID"] == "req-42"
            assert "Retry-After" not in refused.headers
            assert not calls.reached("POST", other)

            # a read passes whoever owns its key; Operation-Type: write makes it a write
            assert (await client.read(other)).status == 200 and calls.reached("GET", other)
            as_write = await client.read(own, headers=[("Operation-Type", "write")])
            assert as_write.status == 200 and calls.reached("GET", own)
            assert (await client.read(other, headers=[("Operation-Type", "write")])).status == 421

            missing = await client.write(None, headers=[("X-Request-ID", "not valid!")])
            assert (missing.status, missing.error, missing.body["request_id"]) == (
                400,
                "missing_shard_key",
                None,
            )
            assert "X-Request-ID" not in missing.headers
            repeated = await client.write(own, headers=[(KEY_HEADER, own)])
            assert (repeated.status, repeated.error) == (400, "invalid_shard_key")
            status, body = await raw_request(client.port, raw_write_head(b"caf\xe9-latin1"))
            assert (status, body["error"]) == (400, "invalid_shard_key")
            status, body = await raw_request(client.port, raw_write_head(own.encode(), b"user-id: other\r\n"))
            assert (status, body["error"]) == (400, "invalid_shard_key")  # one field, whatever its case
            assert calls.seen.count(("POST", own)) == 1  # only the one accepted write got through

            state = await client.state()
            assert state["accepted"] == 2
            assert state["refused"] == {
                "misdirected_write": 2,
                "missing_shard_key": 1,
                "invalid_shard_key": 3,
            }

    run(scenario)


def test_state_endpoint_and_writes_before_the_first_state(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    calls = Calls()
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, calls) as client:
            state = await client.state()
            assert state["fence"] == 1 and state["group"] == OWN and isinstance(state["pod"], str)
            assert (state["generation"], state["phase"], state["epoch"], state["confirmed"]) == (
                None,
                None,
                None,
                False,
            )
            assert (state["confirmed_age"], state["lease_seconds"], state["writes_in_flight"]) == (
                None,
                None,
                0,
            )
            refused = await client.write(own)
            assert (refused.status, refused.error, refused.headers.get("Retry-After")) == (
                503,
                "shard_state_unconfirmed",
                "1",
            )
            assert refused.headers["X-Shard-Fence"] == "shard_state_unconfirmed"
            assert (await client.read(own)).status == 200
            assert calls.seen == [("GET", own)]

            write_state(state_file, stable(1, config_text(lease=30)))
            state = await confirmed_at(client, 1)
            assert state["phase"] == "stable" and state["next_epoch"] is None
            assert state["lease_seconds"] == 30 and 0 <= state["confirmed_age"] <= 30
            assert (await client.write(own)).status == 200

    run(scenario)


def test_a_newer_state_file_is_applied_and_an_older_one_ignored(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    calls = Calls()
    moving, staying = moving_key(OWN, "group-4"), key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, calls) as client:
            first = await confirmed_at(client, 1)
            assert (await client.write(moving)).status == 200

            write_state(state_file, fencing(2, config_text(), config_text(GROWN)))
            state = fenced = await confirmed_at(client, 2)
            assert state["phase"] == "fencing" and state["epoch"] == first["epoch"]
            assert state["next_epoch"] not in (None, first["epoch"])
            refused = await client.write(moving)
            assert (refused.status, refused.error, refused.body["owner"]) == (421, "shard_moving", "group-4")
            assert (refused.body["generation"], refused.headers.get("Retry-After")) == (2, "1")
            assert (await client.write(staying)).status == 200

            # An older generation (a late or stale writer) never replaces the view held; the
            # ?generation= above the held one makes the fence read the file before answering.
            write_state(state_file, stable(1, config_text(GROWN)))
            state = await client.state(generation=3)
            assert (state["generation"], state["phase"]) == (2, "fencing")
            assert (await client.write(moving)).error == "shard_moving"

            write_state(state_file, stable(3, config_text(GROWN)))
            state = await confirmed_at(client, 3)
            assert (state["phase"], state["epoch"], state["next_epoch"]) == (
                "stable",
                fenced["next_epoch"],
                None,
            )
            refused = await client.write(moving)
            assert (refused.error, refused.body["owner"]) == ("misdirected_write", "group-4")

    run(scenario)


def test_an_invalid_state_file_keeps_the_last_good_view(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            first = await confirmed_at(client, 1)
            bad_documents = [
                "{not json",
                '{"version": 1, "generation": 2, "phase": "fencing", "config": "x", "since": 0}',
                stable(2, "version: 1\ngroups: []\n").to_json(),  # a state whose config is invalid
            ]
            for bad in bad_documents:
                write_state(state_file, bad)
                state = await client.state(generation=2)  # read it now
                assert (state["generation"], state["epoch"]) == (1, first["epoch"]), bad
                assert (await client.write(own)).status == 200  # within the lease of the last good read
            write_state(state_file, stable(2, config_text(GROWN)))
            state = await client.state(generation=2)
            assert state["generation"] == 2 and state["confirmed"]

    run(scenario)


def test_a_write_in_flight_is_counted_while_its_key_starts_moving(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))
    key = moving_key(OWN, "group-4")
    calls = Calls(gates={key: threading.Event()})

    async def scenario() -> None:
        async with serve_aiohttp(fence, calls) as client:
            await confirmed_at(client, 1)
            write = asyncio.create_task(client.write(key))
            state = await client.until_state(lambda s: s["writes_in_flight"] == 1)
            assert state["moving_writes_in_flight"] == 0  # not moving under generation 1

            write_state(state_file, fencing(2, config_text(), config_text(GROWN)))
            state = await client.state(generation=2)
            assert (state["generation"], state["writes_in_flight"], state["moving_writes_in_flight"]) == (
                2,
                1,
                1,
            )
            assert (await client.write(key)).error == "shard_moving"  # a new one is refused

            calls.gates[key].set()
            assert (await write).status == 200  # accepted before the switch: it completes
            state = await client.until_state(lambda s: s["writes_in_flight"] == 0)
            assert state["moving_writes_in_flight"] == 0
            assert calls.seen.count(("POST", key)) == 1

    run(scenario)


def test_a_state_file_that_cannot_be_read_runs_the_lease_out(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    good = stable(1, config_text(lease=1.5))
    write_state(state_file, good)
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            await confirmed_at(client, 1)
            state_file.unlink()

            async def refused() -> bool:
                return (await client.write(own)).status == 503

            assert await eventually(refused)
            reply = await client.write(own)
            assert (reply.error, reply.headers.get("Retry-After")) == ("shard_state_unconfirmed", "1")
            state = await client.state()
            assert not state["confirmed"] and state["confirmed_age"] > state["lease_seconds"] == 1.5
            assert state["generation"] == 1  # the view stays; only its lease ran out
            assert (await client.read(own)).status == 200

            write_state(state_file, good)
            await confirmed_at(client, 1)
            assert (await client.write(own)).status == 200

    run(scenario)


def test_the_fence_starts_and_stops_with_the_app(tmp_path: Path) -> None:
    fence, state_file = file_fence(tmp_path)
    write_state(state_file, stable(1, config_text()))

    async def scenario() -> None:
        assert not fence.running
        async with serve_aiohttp(fence, Calls()) as client:
            assert fence.running
            await confirmed_at(client, 1)
        assert not fence.running
        await fence.stop()  # idempotent

    run(scenario)
