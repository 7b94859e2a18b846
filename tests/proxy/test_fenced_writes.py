"""A fenced pod's 421 (``X-Shard-Fence``: its handler did not run) is never passed to the client:
the gateway asks for a newer view of the shard state at once, and the write goes once more,
only to its owner in the newest view (held up to ``handoff.hold_seconds`` for a view that names
one), or is answered ``503 shard_moving`` + Retry-After (docs/design/014-ownership-handoff.md,
docs/contract.md).

In process: the gateway's client protocol on a fake transport, in front of real upstream
servers on 127.0.0.1 that answer 421 the way ``gateway.fence`` does, or 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.config import parse_shard_config
from gateway.topology import Topology, TopologyBuilder
from tests.proxy.harness import (
    KEY_HEADER,
    FakeTransport,
    Harness,
    RecordedHead,
    RecordingUpstream,
    harness,
    responses_in,
)

FENCED_BODY = json.dumps({"error": "shard_moving", "detail": "moving", "owner": None, "epoch": "x"}).encode()


@dataclass
class Pod(RecordingUpstream):
    """A pod that keeps every request (head and body) and answers each with ``status``; a 421
    carries ``X-Shard-Fence`` when ``fence`` (as the fence's own answers do). Answers wait for
    ``release``."""

    status: int = 200
    fence: bool = True

    @property
    def requests(self) -> list[tuple[RecordedHead, bytes]]:
        return list(zip(self.heads, self.bodies, strict=False))  # (a head whose body is on its way)

    async def wait_to_answer(self, head: RecordedHead) -> None:
        await self.release.wait()

    def answer(self, head: RecordedHead) -> bytes:
        if self.status == 200:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        fence = b"X-Shard-Fence: shard_moving\r\n" if self.fence else b""
        return (
            b"HTTP/1.1 %d Misdirected Request\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (self.status, fence, len(FENCED_BODY), FENCED_BODY)
        )


HOLD = 0.3  # handoff.hold_seconds of these tests' views: how long a fenced write waits


def topology(
    group: str, pod: Pod, hold: float = HOLD, vnodes: int = 160, generation: int | None = None
) -> Topology:
    """Every key owned by ``group`` (its only group), whose one pod is ``pod``."""
    text = (
        "version: 1\n"
        f"routing: {{key_header: {KEY_HEADER}}}\n"
        f"ring: {{vnodes: {vnodes}}}\n"
        f"handoff: {{hold_seconds: {hold}}}\n"
        f'groups:\n  - name: {group}\n    endpoints: ["127.0.0.1:{pod.port}"]\n'
    )
    return TopologyBuilder().build(parse_shard_config(text), generation=generation)


def post(body: bytes, key: str = "alice") -> bytes:
    return (
        f"POST /w HTTP/1.1\r\nHost: t\r\n{KEY_HEADER}: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@dataclass
class Scene:
    plane: Harness
    old: Pod  # the pod the gateway's view sends the write to: it answers 421 (or 200)
    new: Pod  # the owner in a newer view
    asks: list[float]  # when the data plane asked the control plane to read the shard state


@pytest.fixture
def scene() -> Iterator[Scene]:
    with harness() as plane:
        old, new = Pod(status=421), Pod()
        new.release.set()
        plane.run(old.start())
        plane.run(new.start())
        plane.holder.swap(topology("group-1", old))
        asks: list[float] = []
        plane.ctx.read_state_soon = lambda: asks.append(plane.loop.time())
        plane.ctx.start()  # the sweeper ends holds at their deadline
        try:
            yield Scene(plane, old, new, asks)
        finally:
            plane.run(plane.ctx.stop())
            plane.run(old.stop())
            plane.run(new.stop())


def answer_after(scene: Scene, request: bytes, newer_view: bool) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send ``request``; once the old pod has it, maybe swap in the newer view; then let the old
    pod answer and return the client's one response."""
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [request])
    plane.wait_for(lambda: len(scene.old.requests) == 1)
    if newer_view:
        plane.holder.swap(topology("group-2", scene.new))
    scene.old.release.set()
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    (response,) = responses_in(bytes(transport.written))
    return response


def epoch_of(head: RecordedHead) -> bytes:
    return dict((name.lower(), value) for name, value in head.fields)[b"x-shard-epoch"]


def test_a_fenced_421_asks_for_a_newer_view_and_is_held_then_answered_503_if_none_comes(
    scene: Scene,
) -> None:
    status, headers, body = answer_after(scene, post(b'{"n": 1}'), newer_view=False)
    assert status == 503
    assert json.loads(body)["error"] == "shard_moving"
    assert headers[b"retry-after"] == b"1"
    assert scene.new.requests == [] and len(scene.old.requests) == 1
    assert len(scene.asks) == 1  # the control plane was asked to read the shard state at once
    metrics = scene.plane.metrics
    assert (metrics.fenced_writes_held, metrics.held_writes_refused) == (1, 1)
    assert (metrics.fenced_writes_resent, metrics.fenced_writes_refused) == (0, 0)


def held_after_a_421(scene: Scene, request: bytes) -> FakeTransport:
    """Send ``request``; the old pod answers 421 at once; return once the write is held."""
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [request])
    scene.old.release.set()
    plane.wait_for(lambda: plane.metrics.fenced_writes_held == 1)
    return transport


def only_response(scene: Scene, transport: FakeTransport) -> tuple[int, dict[bytes, bytes], bytes]:
    scene.plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    (response,) = responses_in(bytes(transport.written))
    return response


def test_a_held_fenced_write_goes_to_the_owner_a_newer_view_names(scene: Scene) -> None:
    plane = scene.plane
    transport = held_after_a_421(scene, post(b'{"n": 3}'))
    assert scene.new.requests == [] and transport.written == bytearray()  # held: sent nowhere
    plane.holder.swap(topology("group-2", scene.new))  # what the read the 421 asked for brings
    status, headers, body = only_response(scene, transport)
    assert (status, body, headers[b"x-shard-group"]) == (200, b"ok", b"group-2")
    ((_, again_body),) = scene.new.requests
    assert again_body == b'{"n": 3}'
    assert plane.metrics.held_writes_sent == 1


def test_a_held_fenced_write_is_never_sent_back_to_the_group_that_refused_it(scene: Scene) -> None:
    transport = held_after_a_421(scene, post(b"{}"))
    scene.old.status = 200  # (it would accept it now: it must not get it)
    scene.plane.holder.swap(topology("group-1", scene.old, vnodes=150))  # a newer view, same owner
    status, _, body = only_response(scene, transport)
    assert status == 503 and json.loads(body)["error"] == "shard_moving"
    assert len(scene.old.requests) == 1


def test_a_held_fenced_write_goes_back_to_the_refusing_group_on_a_newer_generation(
    scene: Scene,
) -> None:
    """A rollback: the refusing group owns the key again in a newer state, so its fence (which
    still decides) may take it now."""
    transport = held_after_a_421(scene, post(b'{"n": 4}'))
    scene.old.status = 200
    scene.plane.holder.swap(topology("group-1", scene.old, vnodes=150, generation=7))
    status, _, body = only_response(scene, transport)
    assert (status, body) == (200, b"ok")
    assert [b for _, b in scene.old.requests] == [b'{"n": 4}', b'{"n": 4}']


def test_a_fenced_write_whose_newest_view_refuses_it_otherwise_is_answered_shard_moving_at_once(
    scene: Scene,
) -> None:
    plane = scene.plane
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(scene.old.requests) == 1)
    plane.holder.set_confirmed(False)  # the newest view answers shard_state_unconfirmed
    scene.old.release.set()
    status, _, body = only_response(scene, transport)
    assert (status, json.loads(body)["error"]) == (503, "shard_moving")  # the contract's answer
    assert (plane.metrics.fenced_writes_refused, plane.metrics.fenced_writes_held) == (1, 0)


def test_a_fenced_421_is_answered_503_at_once_when_nothing_is_held(scene: Scene) -> None:
    scene.plane.holder.swap(topology("group-1", scene.old, hold=0))
    status, headers, body = answer_after(scene, post(b"{}"), newer_view=False)
    assert (status, json.loads(body)["error"], headers[b"retry-after"]) == (503, "shard_moving", b"1")
    metrics = scene.plane.metrics
    assert (metrics.fenced_writes_refused, metrics.fenced_writes_held) == (1, 0)
    assert scene.new.requests == []


def test_a_fenced_421_sends_the_write_once_more_to_the_owner_in_the_newest_view(scene: Scene) -> None:
    status, headers, body = answer_after(scene, post(b'{"n": 2}'), newer_view=True)
    assert (status, body) == (200, b"ok")
    assert headers[b"x-shard-group"] == b"group-2"
    ((first, first_body),) = scene.old.requests
    ((again, again_body),) = scene.new.requests
    assert again_body == first_body == b'{"n": 2}'
    # The resend says the epoch of the view it was decided on and its pod's group, and is
    # otherwise the same head.
    assert epoch_of(again) == scene.plane.holder.current.epoch_bytes != epoch_of(first)
    assert (b"X-Shard-Group", b"group-2") in again.fields
    per_view = (b"X-Shard-Epoch", b"X-Shard-Group")
    assert [f for f in again.fields if f[0] not in per_view] == [
        f for f in first.fields if f[0] not in per_view
    ]
    assert scene.plane.metrics.fenced_writes_resent == 1


def test_a_resent_write_is_not_resent_again(scene: Scene) -> None:
    scene.new.status = 421  # the newer owner's fence refuses it too
    status, _, body = answer_after(scene, post(b"{}"), newer_view=True)
    assert status == 503 and json.loads(body)["error"] == "shard_moving"
    assert len(scene.new.requests) == 1
    assert (scene.plane.metrics.fenced_writes_resent, scene.plane.metrics.fenced_writes_refused) == (1, 1)


def test_a_write_whose_body_was_too_long_to_keep_is_answered_503_not_resent(scene: Scene) -> None:
    from gateway.proxy.exchange import RESEND_BODY_LIMIT

    status, _, body = answer_after(scene, post(b"x" * (RESEND_BODY_LIMIT + 1)), newer_view=True)
    assert status == 503 and json.loads(body)["error"] == "shard_moving"
    assert scene.new.requests == []


def test_an_applications_own_421_is_passed_on(scene: Scene) -> None:
    scene.old.fence = False  # no X-Shard-Fence: the application answered, not the fence
    status, _, body = answer_after(scene, post(b"{}"), newer_view=True)
    assert status == 421 and body == FENCED_BODY
    assert scene.new.requests == []


def test_the_client_connection_goes_on_after_a_fenced_write(scene: Scene) -> None:
    plane = scene.plane
    scene.old.release.set()
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    scene.old.status = 200
    plane.feed(client, [post(b"{}")])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 2)
    assert [r[0] for r in responses_in(bytes(transport.written))] == [503, 200]
    assert not transport.closed
