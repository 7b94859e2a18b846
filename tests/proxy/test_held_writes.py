"""A write for a moving key, during a hand-off's fence phase, is held at the gateway for up to
``handoff.hold_seconds``: sent nowhere before the commit, then to the key's new owner, or
answered ``503 shard_moving`` + Retry-After when the hold ends first
(docs/design/014-ownership-handoff.md, docs/contract.md "Hand-off").

In process: the client protocol on a fake transport, in front of real upstream servers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.config import parse_shard_config
from gateway.proxy.plane import BarrierReports, moving_writes_in_flight
from gateway.topology import Handoff, Topology, TopologyBuilder
from tests.proxy.harness import KEY_HEADER, Harness, harness, responses_in
from tests.proxy.test_fenced_writes import Pod, epoch_of, post


def topology(
    group: str, pod: Pod, hold: float, generation: int, handoff_to: Topology | None = None
) -> Topology:
    """Every key owned by ``group`` (its only group, pod ``pod``); with ``handoff_to``, fencing
    towards that topology (so every key is moving)."""
    text = (
        "version: 1\n"
        f"routing: {{key_header: {KEY_HEADER}}}\n"
        f"handoff: {{hold_seconds: {hold}}}\n"
        f'groups:\n  - name: {group}\n    endpoints: ["127.0.0.1:{pod.port}"]\n'
    )
    handoff = Handoff(generation, handoff_to, False) if handoff_to is not None else None
    return TopologyBuilder().build(parse_shard_config(text), generation=generation, handoff=handoff)


@dataclass
class Scene:
    plane: Harness
    old: Pod  # the owner in the config in force
    new: Pod  # the owner in the config handed to
    committed: Topology  # the stable state after the hand-off


def scene_with_hold(hold: float) -> Iterator[Scene]:
    with harness() as plane:
        old, new = Pod(), Pod()
        old.release.set()
        new.release.set()
        plane.run(old.start())
        plane.run(new.start())
        committed = topology("group-2", new, hold, generation=3)
        plane.holder.swap(topology("group-1", old, hold, generation=2, handoff_to=committed))
        plane.ctx.start()  # the sweeper ends holds at their deadline
        try:
            yield Scene(plane, old, new, committed)
        finally:
            plane.run(plane.ctx.stop())
            plane.run(old.stop())
            plane.run(new.stop())


@pytest.fixture
def scene() -> Iterator[Scene]:
    yield from scene_with_hold(30.0)


@pytest.fixture
def short_hold() -> Iterator[Scene]:
    yield from scene_with_hold(0.2)


def test_a_held_write_goes_nowhere_before_the_commit_then_to_the_new_owner(scene: Scene) -> None:
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [post(b'{"held": true}')])
    plane.wait_for(lambda: len(plane.ctx.held) == 1)
    plane.run(_a_few_loop_turns())
    assert transport.written == b"" and scene.old.requests == [] and scene.new.requests == []
    plane.holder.swap(scene.committed)
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    ((status, headers, body),) = responses_in(bytes(transport.written))
    assert (status, body, headers[b"x-shard-group"]) == (200, b"ok", b"group-2")
    ((head, sent_body),) = scene.new.requests
    assert sent_body == b'{"held": true}'
    assert epoch_of(head) == scene.committed.epoch_bytes
    assert scene.old.requests == []
    assert plane.ctx.held == set()
    assert (plane.metrics.held_writes_sent, plane.metrics.held_writes_refused) == (1, 0)


def test_a_write_held_past_hold_seconds_is_answered_503_shard_moving(short_hold: Scene) -> None:
    plane = short_hold.plane
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    ((status, headers, body),) = responses_in(bytes(transport.written))
    assert status == 503 and json.loads(body)["error"] == "shard_moving"
    assert headers[b"retry-after"] == b"1"
    assert short_hold.old.requests == [] and short_hold.new.requests == []
    assert plane.ctx.held == set()
    assert plane.metrics.held_writes_refused == 1
    # The connection goes on: the next write, after the commit, is served by the new owner.
    plane.holder.swap(short_hold.committed)
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 2)
    assert responses_in(bytes(transport.written))[1][0] == 200


def test_reads_and_keys_that_do_not_move_are_not_held(scene: Scene) -> None:
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [f"GET /r HTTP/1.1\r\nHost: t\r\n{KEY_HEADER}: alice\r\n\r\n".encode()])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    assert responses_in(bytes(transport.written))[0][0] == 200
    assert plane.ctx.held == set()


def test_a_held_write_whose_client_goes_away_is_dropped(scene: Scene) -> None:
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(plane.ctx.held) == 1)
    transport.abort()
    plane.run(_a_few_loop_turns())
    plane.holder.swap(scene.committed)
    assert plane.ctx.held == set()
    plane.run(_a_few_loop_turns())
    assert scene.new.requests == [] and scene.old.requests == []


async def _a_few_loop_turns() -> None:
    import asyncio

    for _ in range(20):
        await asyncio.sleep(0)


def test_a_write_sent_before_the_fence_phase_is_a_moving_write_in_flight_until_answered() -> None:
    """What the replica reports to the hand-off's barrier: the generation it routes on, and its
    writes in flight (decided on the view before) whose key the fence phase moves."""
    with harness() as plane:
        old, new = Pod(), Pod()  # the old owner answers only when released
        new.release.set()
        plane.run(old.start())
        plane.run(new.start())
        committed = topology("group-2", new, 30.0, generation=3)
        plane.holder.swap(topology("group-1", old, 30.0, generation=1))
        reports: list[tuple[int | None, int]] = []
        BarrierReports(
            lambda: moving_writes_in_flight(plane.ctx), plane.holder, lambda g, n: reports.append((g, n))
        )
        client, transport = plane.connect()
        plane.feed(client, [post(b"{}")])
        plane.wait_for(lambda: len(old.requests) == 1)
        fencing = topology("group-1", old, 30.0, generation=2, handoff_to=committed)

        async def swap() -> None:  # (on the loop, as the control plane swaps)
            plane.holder.swap(fencing)

        plane.run(swap())
        assert reports == [(2, 1)]
        old.release.set()
        plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
        plane.wait_for(lambda: reports[-1] == (2, 0))  # counted again until none is left
        assert set(reports) == {(2, 1), (2, 0)}
        plane.run(old.stop())
        plane.run(new.stop())
