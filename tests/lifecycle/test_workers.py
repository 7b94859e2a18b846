"""``--workers 2``: a supervisor and two SO_REUSEPORT data-plane processes, as one replica.

Both workers take connections; ``/metrics`` adds up their counters; a worker killed with
SIGKILL is restarted (and counted) while requests keep succeeding on the other; SIGTERM to the
supervisor drains both (an in-flight request completes) and the whole process tree exits 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.build import PURE_PYTHON_ENV
from tests.integration.conftest import REPO_ROOT, Gateway, Recipe, config_document, group_of
from tests.integration.conftest import GatewayFactory as StaticGatewayFactory
from tests.lifecycle.conftest import (
    Background,
    ConnectionFailed,
    TrackedConn,
    UpstreamSet,
    connect_refused,
    established_on,
    one_request,
    pid_gone,
    pipe_pending,
    readyz,
    wait_for,
)
from tests.support import free_port

DRAIN_DELAY = 2.0


def worker_pids(gw: Gateway) -> list[int]:
    """Worker pids by index, from /debug/ring (None while one is being restarted: not listed)."""
    workers = gw.debug_ring()["workers"]
    return [w["pid"] for w in sorted(workers, key=lambda w: w["index"]) if w["pid"] and w["ready"]]


def connections_per_worker(gw: Gateway, pids: list[int], keys: list[str], count: int = 16) -> dict[int, int]:
    """Open ``count`` fresh connections (one request each, kept open); where did they land?"""
    conns = [TrackedConn(gw.port) for _ in range(count)]
    try:
        for i, conn in enumerate(conns):
            resp = conn.request("POST" if i % 2 == 0 else "GET", "/orders", keys[i % len(keys)])
            assert resp.status == 200 and not resp.closes, (resp.status, resp.body[:200])
        peers = {int(conn.sock.getsockname()[1]) for conn in conns}
        return {pid: established_on(pid, gw.port, peers) for pid in pids}
    finally:
        for conn in conns:
            conn.close()


@dataclass(frozen=True)
class Answer:
    at: float
    status: int  # -1: no response
    detail: str  # the error code of a gateway error, or what went wrong


class Requests:
    """A client loop on fresh connections (so every request is a new accept on the port)."""

    def __init__(self, port: int, keys: list[str]) -> None:
        self.port = port
        self.keys = keys
        self.answers: list[Answer] = []
        self._stopping = threading.Event()
        self._runner = Background(self._run, name="fresh-connections")

    def _run(self) -> int:
        i = 0
        while not self._stopping.is_set():
            key = self.keys[i % len(self.keys)]
            try:
                resp = one_request(self.port, "POST" if i % 2 == 0 else "GET", "/orders", key)
                code = "" if resp.status == 200 else str(resp.json().get("error"))
                self.answers.append(Answer(time.monotonic(), resp.status, code))
            except (OSError, ConnectionFailed, ValueError) as exc:
                self.answers.append(Answer(time.monotonic(), -1, f"{type(exc).__name__}: {exc}"))
            i += 1
        return i

    def stop(self) -> list[Answer]:
        self._stopping.set()
        self._runner.result(20)
        return self.answers


@pytest.mark.timeout(60)
def test_two_workers_share_the_port_restart_after_sigkill_and_drain_on_sigterm(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pods = [upstreams("g-a", "a-1"), upstreams("g-b", "b-1")]
    groups = [group_of("g-a", [pods[0].address]), group_of("g-b", [pods[1].address])]
    recipe = Recipe(groups)
    keys = recipe.keys_owned_by("g-a", 4) + recipe.keys_owned_by("g-b", 4)
    env = {"SHARDGATE_WORKERS": "2", "SHARDGATE_DRAIN_DELAY": str(DRAIN_DELAY)}
    env["SHARDGATE_GRACE_TIMEOUT"] = "15"
    gw = static_gateways(groups, env=env)
    assert gw.metric("shardgate_workers_ready") == 2
    first = worker_pids(gw)
    assert len(set(first)) == 2 and gw.pid not in first and not any(pid_gone(p) for p in first), first

    # Both workers accept connections on the one port.
    spread = connections_per_worker(gw, first, keys)
    assert sum(spread.values()) == 16 and all(spread.values()), spread
    # /metrics adds up both workers' counters.
    for i in range(24):
        resp = one_request(gw.port, "POST" if i % 2 == 0 else "GET", "/orders", keys[i % len(keys)])
        assert resp.status == 200, resp
    assert gw.metric("shardgate_requests_total") == 16 + 24, gw.metric("shardgate_requests_total")
    assert gw.metric("shardgate_worker_restarts_total") == 0

    # SIGKILL one worker: the other serves every new connection; the dead one is restarted.
    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel had queued on the dead worker's socket die with it (SO_REUSEPORT);
    # once it is gone, every new connection goes to a live worker.
    assert wait_for(lambda: pid_gone(victim)), "the killed worker is still there"
    load = Requests(gw.port, keys)
    try:
        assert wait_for(lambda: gw.metric("shardgate_worker_restarts_total") == 1, timeout=15), gw.log_tail()
        assert wait_for(lambda: gw.metric("shardgate_workers_ready") == 2), gw.log_tail()
        assert wait_for(lambda: readyz(gw.admin_port) == 200)
        restarted = worker_pids(gw)
        assert len(restarted) == 2 and restarted[1] == survivor and restarted[0] != victim, (first, restarted)
        assert wait_for(lambda: len(load.answers) >= 50), "no requests went through meanwhile"
    finally:
        answers = load.stop()
    failed = [a for a in answers if a.status != 200]
    print(f"\nwhile a worker restarted: {len(answers)} requests")
    assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:5]}"
    # The new worker takes its share of connections.
    spread = connections_per_worker(gw, restarted, keys)
    assert all(spread.values()), spread
    assert gw.metric("shardgate_worker_restarts_total") == 1

    # SIGTERM to the supervisor: both workers drain; an in-flight request completes.
    key = keys[0]
    held = Background(lambda: one_request(gw.port, "POST", "/hold?gate=drain", key), name="held")
    try:
        assert wait_for(lambda: len(upstreams.hits(lambda h: h.path == "/hold")) == 1), "held never sent"
        gw.expect_exit = True
        sigterm = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: readyz(gw.admin_port) == 503, timeout=2.0), "/readyz still 200"
        resp = one_request(gw.port, "GET", "/orders", key)  # still served during the drain delay
        assert resp.status == 200 and time.monotonic() < sigterm + DRAIN_DELAY, resp
        assert wait_for(lambda: connect_refused(gw.port), timeout=DRAIN_DELAY + 5), "still accepting"
        assert time.monotonic() - sigterm >= DRAIN_DELAY - 0.1
        assert gw.alive(), "exited with a request in flight"
    finally:
        for pod in pods:
            pod.release("drain")
    answer = held.result(10)
    assert answer.status == 200 and answer.closes, (answer.status, answer.headers)
    assert answer.header("X-Shard-Group") == recipe.owner(key)
    assert gw.proc.wait(15) == 0, gw.log_tail()
    every = {*first, *restarted}
    assert wait_for(lambda: all(pid_gone(p) for p in every)), [p for p in every if not pid_gone(p)]


@pytest.mark.timeout(40)
def test_a_starting_worker_takes_no_request_before_it_has_a_topology(
    upstreams: UpstreamSet, tmp_path: Path
) -> None:
    """The supervisor's side of the pipe, played by the test, so the moment is exact: the
    worker has read half of its first topology message and waits for the rest."""
    from gateway.config import ShardConfig
    from gateway.ipc import Start, TopologyUpdate
    from gateway.settings import Settings
    from gateway.topology import TopologyBuilder

    pod = upstreams("g-a", "a-1")
    config = ShardConfig.model_validate(config_document([group_of("g-a", [pod.address])]))
    port = free_port()
    settings = Settings.model_validate({"config_path": "shards.yaml", "listen": f"127.0.0.1:{port}"})
    topology = TopologyUpdate.of(TopologyBuilder().build(config))
    message = Start(index=0, settings=settings, topology=topology).encode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_") or k == PURE_PYTHON_ENV}
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.workers"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdin is not None
    early: Background | None = None
    try:
        half = len(message) // 2
        proc.stdin.write(message[:half])
        proc.stdin.flush()
        # Its event loop runs and reads the pipe: the worker is up, without a topology yet.
        fd = proc.stdin.fileno()
        assert wait_for(lambda: pipe_pending(fd) == 0 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
        if not connect_refused(port):
            early = Background(lambda: one_request(port, "GET", "/orders", "k"), name="early")
            with contextlib.suppress(concurrent.futures.TimeoutError):
                # A worker may hold the request until it can route it, but not refuse it.
                resp = early.result(2.0)
                assert resp.status == 200, f"answered {resp.status} before it had a topology: {resp.body!r}"
        proc.stdin.write(message[half:])
        proc.stdin.flush()
        assert wait_for(lambda: not connect_refused(port)), "not listening with a topology"
        assert one_request(port, "GET", "/orders", "k").status == 200
        if early is not None:
            assert early.result(10).status == 200
        proc.stdin.write(b'{"op":"stop","grace":1}\n')
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.timeout(60)
def test_a_data_port_held_by_another_program_fails_the_start(workers: str, tmp_path: Path) -> None:
    """Exit 1 with the reason, rather than workers failing to bind over and over."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable, "-m", "gateway", "run",
                "--config", str(REPO_ROOT / "config" / "local.yaml"),
                "--listen", f"127.0.0.1:{port}",
                "--admin-listen", f"127.0.0.1:{free_port()}",
                "--workers", workers,
            ],
            cwd=REPO_ROOT,
            # (the shard state file is written, so not beside the repository's config)
            env={**os.environ, "SHARDGATE_DRAIN_DELAY": "0", "SHARDGATE_STATE_FILE": str(tmp_path / "state")},
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot start" in result.stdout and "in use" in result.stdout, result.stdout[-2000:]


@pytest.mark.timeout(90)
def test_readyz_is_503_while_a_worker_is_down_and_200_again_after_its_restart(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("g-a", "a-1")
    gw = static_gateways([group_of("g-a", [pod.address])], env={"SHARDGATE_WORKERS": "2"})
    assert readyz(gw.admin_port) == 200
    victim = worker_pids(gw)[0]  # worker 0
    os.kill(victim, signal.SIGKILL)
    answers: list[tuple[int, str]] = []

    def not_ready() -> bool:
        status, _, body = gw.admin_get("/readyz", timeout=5)
        answers.append((status, json.loads(body).get("status", "")))
        return status == 503

    assert wait_for(not_ready, timeout=15, interval=0.005), answers[-5:]
    assert answers[-1] == (503, "workers not ready: [0]"), answers[-1]
    assert wait_for(lambda: readyz(gw.admin_port) == 200, timeout=30), gw.log_tail()
    assert gw.metric("shardgate_worker_restarts_total") == 1
    restarted = worker_pids(gw)
    assert len(restarted) == 2 and victim not in restarted, restarted
    assert one_request(gw.port, "GET", "/orders", "k").status == 200


GRACE_FLAG = 1.0  # --grace-timeout; SHARDGATE_GRACE_TIMEOUT is unset, so a worker that ignores the
# flag waits the default 20 s. Each outcome below is due long before that.
CUT_DEADLINE = 10.0


def held_request(gw: Gateway, pod: Any, key: str) -> tuple[Background, int]:
    """A request the upstream never answers, in flight through one worker; (its result, the pid
    of the worker holding the client connection)."""
    conn = TrackedConn(gw.port, timeout=60)  # a read that outlasts a 20 s grace
    peer = int(conn.sock.getsockname()[1])
    held = Background(lambda: conn.request("GET", "/hold?gate=never", key), name="held")
    assert wait_for(lambda: len(pod.hits(lambda h: h.path == "/hold")) == 1), "the request never got upstream"
    holders = [pid for pid in worker_pids(gw) if established_on(pid, gw.port, {peer})]
    assert len(holders) == 1, holders
    return held, holders[0]


def assert_cut_after_the_grace(held: Background, since: float) -> None:
    with pytest.raises(ConnectionFailed):
        held.result(CUT_DEADLINE)  # concurrent.futures.TimeoutError if still held: the test fails
    # Not cut at once either: in-flight requests get their grace.
    assert time.monotonic() - since >= GRACE_FLAG - 0.05


@pytest.mark.timeout(90)
def test_a_worker_sent_sigterm_honours_the_grace_timeout_flag(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("g-a", "a-1")
    gw = static_gateways(
        [group_of("g-a", [pod.address])],
        env={"SHARDGATE_WORKERS": "2", "SHARDGATE_GRACE_TIMEOUT": ""},
        args=["--grace-timeout", str(GRACE_FLAG)],
    )
    held, worker = held_request(gw, pod, "user-1")
    sigterm = time.monotonic()
    os.kill(worker, signal.SIGTERM)
    assert_cut_after_the_grace(held, sigterm)
    assert wait_for(lambda: pid_gone(worker), timeout=CUT_DEADLINE), "the worker did not exit"
    # The supervisor restarts it; the replica serves on.
    assert wait_for(lambda: gw.metric("shardgate_workers_ready") == 2, timeout=30), gw.log_tail()
    assert one_request(gw.port, "GET", "/orders", "user-1").status == 200


@pytest.mark.timeout(90)
def test_workers_whose_supervisor_is_gone_honour_the_grace_timeout_flag(
    upstreams: UpstreamSet, static_gateways: StaticGatewayFactory
) -> None:
    pod = upstreams("g-a", "a-1")
    gw = static_gateways(
        [group_of("g-a", [pod.address])],
        env={"SHARDGATE_WORKERS": "2", "SHARDGATE_GRACE_TIMEOUT": ""},
        args=["--grace-timeout", str(GRACE_FLAG)],
    )
    workers = worker_pids(gw)
    held, _ = held_request(gw, pod, "user-1")
    gw.expect_exit = True
    killed = time.monotonic()
    gw.proc.kill()  # SIGKILL: the supervisor cannot tell its workers; their stdin closes
    assert_cut_after_the_grace(held, killed)
    assert wait_for(lambda: all(pid_gone(p) for p in workers), timeout=CUT_DEADLINE), [
        p for p in workers if not pid_gone(p)
    ]
