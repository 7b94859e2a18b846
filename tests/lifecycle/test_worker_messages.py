"""A worker process driven over its pipes, the test playing the supervisor (``gateway.ipc``).

Messages on one pipe are read in order, so what a worker answers to a ``metrics`` request
written right after a ``topology`` message says what it did with that topology: still routing
with the old epoch means its event loop answered while the new ring was being built.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.config import ShardConfig
from gateway.ipc import (
    FROM_WORKER,
    Applied,
    FromWorkerMessage,
    MetricsReply,
    MetricsRequest,
    ReadState,
    Ready,
    Start,
    Stop,
    TopologyUpdate,
)
from gateway.ring import config_epoch
from gateway.settings import Settings
from gateway.topology import TopologyBuilder
from gateway.workers import WorkerProcess, replica_report
from tests.integration.conftest import REPO_ROOT, Recipe, config_document, group_of
from tests.lifecycle.conftest import UpstreamSet, connect_refused, one_request, wait_for
from tests.support import BackgroundAiohttp, free_port

BIG = 64  # groups: a ring that takes a good fraction of a second to build (README: ~0.14 s)


class PipedWorker:
    """``python -m gateway.workers`` with the test on both ends of its pipes."""

    def __init__(self, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.workers"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="worker-stdout", daemon=True)
        self._reader.start()
        self._ids = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def write(self, *lines: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(lines))
        self.proc.stdin.flush()

    def next_message(self, timeout: float = 30.0) -> FromWorkerMessage:
        return FROM_WORKER.validate_json(self._lines.get(timeout=timeout))

    def metrics_request(self) -> tuple[int, bytes]:
        self._ids += 1
        return self._ids, MetricsRequest(id=self._ids).encode()

    def reply_to(self, ident: int) -> MetricsReply:
        while True:
            message = self.next_message()
            if isinstance(message, MetricsReply) and message.id == ident:
                return message

    def ask_epoch(self) -> str | None:
        ident, line = self.metrics_request()
        self.write(line)
        return self.reply_to(ident).epoch

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                self.write(Stop(grace=1).encode())
                return self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        return self.proc.wait(5)


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[PipedWorker]:
    worker = PipedWorker(tmp_path / "worker.log")
    yield worker
    worker.stop()


def big_config(pod_address: str, weight_of_first: int = 1) -> ShardConfig:
    """``BIG`` groups; the first is ``g-a`` on the real pod, the others on ports nobody serves."""
    ports = iter(p for p in range(41000, 42000) if f"127.0.0.1:{p}" != pod_address)
    groups = [group_of("g-a", [pod_address], weight_of_first)]
    groups += [group_of(f"g-{n}", [f"127.0.0.1:{next(ports)}"]) for n in range(1, BIG)]
    return ShardConfig.model_validate(config_document(groups))


def start_message(port: int, config: ShardConfig, generation: int | None = None) -> bytes:
    settings = Settings.model_validate({"config_path": "shards.yaml", "listen": f"127.0.0.1:{port}"})
    topology = TopologyUpdate.of(TopologyBuilder().build(config, generation=generation))
    return Start(index=0, settings=settings, topology=topology).encode()


@pytest.mark.timeout(120)
def test_a_ring_rebuild_in_a_worker_does_not_stall_its_loop(
    piped: PipedWorker, upstreams: UpstreamSet
) -> None:
    pod = upstreams("g-a", "a-1")
    small = ShardConfig.model_validate(config_document([group_of("g-a", [pod.address])]))
    big = big_config(pod.address)
    port = free_port()
    piped.write(start_message(port, small))
    assert isinstance(piped.next_message(), Ready), piped.log()
    # A key that g-a owns in both configs: answered by the real pod whichever is in force.
    key = Recipe({g.name: g.weight for g in big.groups}).keys_owned_by("g-a", 1)[0]
    assert one_request(port, "POST", "/orders", key).status == 200

    old, new = config_epoch(small), config_epoch(big)
    ident, metrics = piped.metrics_request()
    piped.write(TopologyUpdate.of(TopologyBuilder().build(big)).encode(), metrics)
    # Read after the topology message: a loop that built the ring on receipt would say `new`.
    assert piped.reply_to(ident).epoch == old, "the worker's loop was held by the ring build"

    # Requests keep being answered meanwhile: a request answered before a metrics request that
    # still finds the old epoch was answered while the new ring was being built.
    during_build = 0
    epoch = old
    deadline = time.monotonic() + 60
    while epoch == old and time.monotonic() < deadline:
        answer = one_request(port, "POST", "/orders", key)
        assert answer.status == 200 and answer.header("X-Shard-Group") == "g-a", answer
        epoch = piped.ask_epoch()
        during_build += epoch == old
    assert epoch == new, f"the new ring never came into force: {piped.log()[-2000:]}"
    assert during_build >= 1
    assert one_request(port, "POST", "/orders", key).status == 200
    print(f"\n{during_build} requests answered while the ring of {BIG} groups was being built")


@pytest.mark.timeout(60)
def test_a_worker_logs_and_ignores_lines_that_are_not_its_messages(
    piped: PipedWorker, upstreams: UpstreamSet
) -> None:
    pod = upstreams("g-a", "a-1")
    config = ShardConfig.model_validate(config_document([group_of("g-a", [pod.address])]))
    port = free_port()
    malformed = [
        b"not json\n",
        b'{"op": "bogus"}\n',
        b'{"op": "topology", "config": {"version": 1, "groups": []}, "pods": {}}\n',
        b'{"op": "metrics"}\n',
        b'{"op": "stop", "grace": -1}\n',
    ]
    piped.write(malformed[0], start_message(port, config))  # junk before the start message too
    assert isinstance(piped.next_message(), Ready), piped.log()
    piped.write(*malformed[1:])
    assert piped.ask_epoch() == config_epoch(config)  # answered after all of them: still there
    assert piped.proc.poll() is None and not connect_refused(port)
    assert one_request(port, "GET", "/orders", "k").status == 200
    ignored = [line for line in piped.log().splitlines() if "none of ours" in line]
    assert len(ignored) == len(malformed), piped.log()
    assert piped.stop() == 0


def test_the_supervisor_logs_and_ignores_lines_that_are_not_a_workers_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``WorkerProcess`` reading a real process that writes junk between its messages; the
    reports for the barrier and the asks for the shard state reach the supervisor's hooks."""
    script = (
        "import sys\n"
        "sys.stdout.write('junk\\n' + '{\"op\": \"metrics\"}\\n' + '\\n'.join(sys.argv[1:]) + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.read()\n"
    )
    applied: list[Applied | None] = []
    asks: list[int] = []

    async def scenario() -> tuple[bool, bool]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            Ready(pid=4242).model_dump_json(),
            Applied(generation=3, moving_in_flight=1).model_dump_json(),
            ReadState().model_dump_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = WorkerProcess(0, proc, lambda: applied.append(worker.applied), lambda: asks.append(1))
        for _ in range(3000):
            if worker.ready and asks:
                break
            await asyncio.sleep(0.01)
        was_ready = worker.ready
        assert proc.stdin is not None
        proc.stdin.close()
        await proc.wait()
        await worker.reader
        return was_ready, worker.ready

    with caplog.at_level("WARNING", logger="shardgate.workers"):
        was_ready, ready_after_exit = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert was_ready, "the ready message after the junk was not read"
    assert not ready_after_exit
    ignored = [r for r in caplog.records if "none of ours" in r.getMessage()]
    assert len(ignored) == 2, [r.getMessage() for r in caplog.records]
    # A dead worker routes nothing: its report is withdrawn.
    assert applied == [Applied(generation=3, moving_in_flight=1), None]
    assert asks == [1]


def fenced_pod_app() -> web.Application:
    """A pod whose fence refuses every write (as ``gateway.fence`` answers: 421 + X-Shard-Fence)."""

    async def refuse(request: web.Request) -> web.Response:
        body = {"error": "shard_moving", "detail": "moving", "owner": None, "epoch": "e"}
        return web.json_response(body, status=421, headers={"X-Shard-Fence": "shard_moving"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


@pytest.mark.timeout(60)
def test_a_worker_reports_the_generation_it_routes_on_and_asks_for_the_state_after_a_fences_421(
    piped: PipedWorker,
) -> None:
    """What the supervisor needs for the hand-off's barrier (the generation each worker has
    applied, its moving writes in flight) and for a fresh view (a fenced pod refused a write)."""
    pod = BackgroundAiohttp(fenced_pod_app, name="fenced-pod")
    pod_port = pod.start()
    try:
        config = ShardConfig.model_validate(config_document([group_of("g-a", [f"127.0.0.1:{pod_port}"])]))
        port = free_port()
        piped.write(start_message(port, config, generation=4))
        assert isinstance(piped.next_message(), Ready), piped.log()
        assert piped.next_message() == Applied(generation=4, moving_in_flight=0)
        piped.write(TopologyUpdate.of(TopologyBuilder().build(config, generation=5)).encode())
        assert piped.next_message() == Applied(generation=5, moving_in_flight=0)

        answer = one_request(port, "POST", "/orders", "k")  # held for a newer view, then refused
        assert answer.status == 503 and b"shard_moving" in answer.body, answer
        assert isinstance(piped.next_message(), ReadState), piped.log()
    finally:
        pod.stop()


def test_a_replica_reports_the_oldest_generation_of_its_workers_and_all_their_moving_writes() -> None:
    def applied(generation: int | None, moving: int) -> Applied:
        return Applied(generation=generation, moving_in_flight=moving)

    assert replica_report([applied(7, 0), applied(6, 2), applied(7, 1)]) == (6, 3)
    assert replica_report([applied(7, 0), None]) == (None, 0)  # one has not said yet
    assert replica_report([applied(7, 1), applied(None, 0)]) == (None, 1)  # one routes on no state
    assert replica_report([]) == (None, 0)


@pytest.mark.timeout(60)
def test_a_worker_refuses_writes_while_the_supervisors_view_is_past_its_lease(
    piped: PipedWorker, upstreams: UpstreamSet
) -> None:
    pod = upstreams("g-a", "a-1")
    config = ShardConfig.model_validate(config_document([group_of("g-a", [pod.address])]))
    port = free_port()
    piped.write(start_message(port, config, generation=1))
    assert isinstance(piped.next_message(), Ready), piped.log()
    confirmed = TopologyUpdate.of(TopologyBuilder().build(config, generation=1))
    piped.write(confirmed.model_copy(update={"unconfirmed": True}).encode())
    assert wait_for(lambda: one_request(port, "POST", "/orders", "k").status == 503), piped.log()
    refused = one_request(port, "POST", "/orders", "k")
    assert b"shard_state_unconfirmed" in refused.body and refused.header("Retry-After") == "1", refused
    assert one_request(port, "GET", "/orders", "k").status == 200  # reads pass
    piped.write(confirmed.encode())
    assert wait_for(lambda: one_request(port, "POST", "/orders", "k").status == 200), piped.log()


@pytest.mark.timeout(60)
def test_a_worker_tells_the_supervisor_which_pods_it_ejected(
    piped: PipedWorker, upstreams: UpstreamSet
) -> None:
    pod = upstreams("g-a", "a-1")
    dead = f"127.0.0.1:{free_port()}"  # refuses connections: ejected by the first request to it
    config = ShardConfig.model_validate(config_document([group_of("g-a", [pod.address, dead])]))
    port = free_port()
    piped.write(start_message(port, config))
    assert isinstance(piped.next_message(), Ready), piped.log()
    for n in range(20):  # (two pods: the dead one is picked within a few requests)
        assert one_request(port, "POST", "/orders", f"k{n}").status == 200  # retried on a-1
    ident, request = piped.metrics_request()
    piped.write(request)
    reply = piped.reply_to(ident)
    assert reply.health == {f"g-a {dead}": "ejected"}
    assert reply.data["ejections"] == {"g-a connect_failure": 1}
