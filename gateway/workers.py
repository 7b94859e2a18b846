"""``--workers N``: N data-plane processes on one port (SO_REUSEPORT) under one supervisor.

The supervisor owns everything that must exist once per replica: the config source and the
Kubernetes watches, the topology, the admin server and the lifecycle. Workers own only a data
plane. The supervisor sends each worker every new topology (the config plus the pods
discovery found), so all workers route with the same epoch and the API server sees one set
of watches per replica. ``/metrics`` asks every worker for its counters and adds them up;
``/readyz`` is 200 only while every worker is up. Messages are JSON lines on the worker's
stdin/stdout; a worker whose stdin closes (the supervisor died) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import uvloop

from gateway.admin import AdminApp, AdminServer
from gateway.config import Limits, Settings, ShardConfig, parse_host_port
from gateway.control import ControlPlane
from gateway.observability.logs import AccessLog, configure_logging, log_format
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import shutdown as shutdown_tracing
from gateway.observability.tracing import tracing_from_env
from gateway.proxy.plane import DataPlane
from gateway.topology import DiscoveredPod, Pod, PodState, Topology, TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate.workers")

MESSAGE_LIMIT = 64 * 1024 * 1024  # a topology of thousands of pods is a few hundred KB
RESTART_DELAY_MAX = 5.0
SCRAPE_TIMEOUT = 2.0


def topology_message(topology: Topology) -> dict[str, Any]:
    pods = {
        name: [[p.host, p.port, str(p.state), p.name] for p in group.pods]
        for name, group in topology.groups.items()
    }
    return {"op": "topology", "config": topology.config.model_dump(mode="json"), "pods": pods}


class WorkerProcess:
    """The supervisor's handle on one worker."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.ready = False
        self.started = time.time()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, message: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    async def ask(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        try:
            await self.send({**message, "id": ident})
            return await asyncio.wait_for(future, timeout)
        except (TimeoutError, ConnectionError):
            return None
        finally:
            self._replies.pop(ident, None)

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        while line := await stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("worker %d said something that is not JSON: %r", self.index, line[:200])
                continue
            if message.get("op") == "ready":
                self.ready = True
            future = self._replies.get(message.get("id", 0))
            if future is not None and not future.done():
                future.set_result(message)
        self.ready = False


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.control = ControlPlane(settings)
        self.metrics = self.control.metrics
        self.workers: list[WorkerProcess | None] = [None] * settings.workers
        self.draining = False
        self.stopping = False
        self._port_reservation: socket.socket | None = None
        self._listen = settings.listen
        self._pod_stats: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._last_counters: dict[int, dict[str, Any]] = {}  # worker index -> last snapshot
        self._retired = Metrics()  # counters of workers that died, still part of the sums
        self._monitors: list[asyncio.Task[None]] = []

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.control.load_initial()
        # Check what the workers will read from the environment before starting any of them.
        shutdown_tracing(tracing_from_env(os.environ))
        AccessLog.from_env(os.environ)
        self._reserve_port()
        admin = AdminApp(
            self.control.holder,
            self.metrics,
            lambda: self.draining,
            self.control.describe_source,
            self.control.watches,
            workers_ready=self._not_ready_reason,
            before_scrape=self._gather_metrics,
            pod_stats=lambda pod: self._pod_stats.get((pod.group, pod.address), (0, 0, 0)),
            extra_debug=lambda: {"workers": self._describe_workers()},
        )
        self._admin = await AdminServer.start(admin, self.settings.admin_listen)
        self.control.holder.subscribe(self._broadcast)
        for index in range(self.settings.workers):
            self._monitors.append(asyncio.get_running_loop().create_task(self._keep_running(index)))
        self.control.start()
        log.info(
            "shardgate supervisor: %d workers on %s:%d (admin %s:%d)",
            self.settings.workers,
            *self._listen,
            *self._admin.address,
        )

    def _reserve_port(self) -> None:
        """Bind the port once (SO_REUSEPORT, never listening) before any worker starts: port 0
        is resolved to one port for all workers, and a port another program holds fails the
        start here instead of sending workers into a restart loop."""
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))  # bound, never listening: holds the port, takes no connections
        except OSError:
            sock.close()
            raise
        self._port_reservation = sock
        self._listen = (host, sock.getsockname()[1])

    async def _keep_running(self, index: int) -> None:
        """Run worker ``index``; restart it when it dies (with a growing delay if it keeps dying)."""
        delay = 0.2
        while not self.stopping:
            worker = await self._spawn(index)
            self.workers[index] = worker
            code = await worker.proc.wait()
            await worker.reader
            self._retire(index)
            if self.stopping:
                return
            self.metrics.worker_restarts += 1
            lived = time.time() - worker.started
            delay = 0.2 if lived > 10 else min(RESTART_DELAY_MAX, delay * 2)
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.1fs", index, worker.proc.pid, code, delay
            )
            await asyncio.sleep(delay)

    def _retire(self, index: int) -> None:
        """Keep a dead worker's last counters in the sums (its open connections are gone)."""
        last = self._last_counters.pop(index, None)
        if last is not None:
            last["counters"]["client_connections_open"] = 0
            self._retired.merge(last)

    async def _spawn(self, index: int) -> WorkerProcess:
        env = dict(os.environ)
        env["SHARDGATE_LISTEN"] = f"{self._listen[0]}:{self._listen[1]}"
        env["SHARDGATE_WORKER_INDEX"] = str(index)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
            limit=MESSAGE_LIMIT,
        )
        worker = WorkerProcess(index, proc)
        topology = self.control.current
        # Always a first message: the worker binds the port only after reading it.
        await worker.send(topology_message(topology) if topology is not None else {"op": "no_topology"})
        return worker

    def _broadcast(self, topology: Topology) -> None:
        message = topology_message(topology)
        for worker in self.workers:
            if worker is not None:
                asyncio.get_running_loop().create_task(worker.send(message))

    # -- admin hooks ---------------------------------------------------------------------------

    def _not_ready_reason(self) -> str | None:
        down = [i for i, w in enumerate(self.workers) if w is None or not w.ready]
        return f"workers not ready: {down}" if down else None

    async def _gather_metrics(self) -> None:
        """Sum the workers' counters. A worker that does not answer in time counts with its
        last answer, and a dead worker's last answer stays in the sum (``_retired``), so the
        summed counters never go down, which Prometheus would take for a reset."""
        live = [w for w in self.workers if w is not None and w.ready]
        replies = await asyncio.gather(*(w.ask({"op": "metrics"}, SCRAPE_TIMEOUT) for w in live))
        for worker, reply in zip(live, replies, strict=True):
            if reply is not None:
                self._last_counters[worker.index] = reply["data"]
        self.metrics.reset_data_plane()
        self.metrics.merge(self._retired.snapshot())
        for snapshot in self._last_counters.values():
            self.metrics.merge(snapshot)
        pod_stats: dict[tuple[str, str], tuple[int, int, int]] = {}
        for reply in replies:
            if reply is None:
                continue
            for group, address, *stats in reply["pods"]:
                before = pod_stats.get((group, address), (0, 0, 0))
                pod_stats[(group, address)] = (
                    before[0] + stats[0],
                    before[1] + stats[1],
                    before[2] + stats[2],
                )
        self._pod_stats = pod_stats
        self.metrics.workers_ready = sum(1 for w in self.workers if w is not None and w.ready)

    def _describe_workers(self) -> list[dict[str, object]]:
        return [
            {"index": i, "pid": w.proc.pid if w else None, "ready": bool(w and w.ready)}
            for i, w in enumerate(self.workers)
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        self.draining = True
        for worker in self.workers:
            if worker is not None:
                asyncio.get_running_loop().create_task(worker.send({"op": "drain"}))

    async def stop(self) -> None:
        """Every worker drains (stops accepting, finishes in-flight requests up to the grace
        timeout); the supervisor waits for all of them, then stops itself."""
        self.draining = True
        self.stopping = True
        grace = self.settings.grace_timeout
        workers = [w for w in self.workers if w is not None]
        await asyncio.gather(*(w.send({"op": "stop", "grace": grace}) for w in workers))
        waits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace + 5)
            for worker in workers:
                if worker.proc.returncode is None:
                    log.warning("worker %d did not stop in time; killing it", worker.index)
                    worker.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in self._monitors:
            task.cancel()
        await self.control.stop()
        await self._admin.stop()
        if self._port_reservation is not None:
            self._port_reservation.close()

    def reload_config(self) -> None:
        self.control.reload()

    def exit_now(self) -> None:
        """The second signal: workers must not outlive the supervisor."""
        self.kill_workers()

    def kill_workers(self) -> None:
        for worker in self.workers:
            if worker is not None and worker.proc.returncode is None:
                worker.proc.kill()


# -- the worker process ----------------------------------------------------------------------


class Worker:
    def __init__(self, listen: tuple[str, int], env: Mapping[str, str]) -> None:
        self.metrics = Metrics()
        self.holder = TopologyHolder(log_changes=False)  # the supervisor logs epoch changes once
        self.builder = TopologyBuilder()
        self.data = DataPlane(
            listen,
            Limits.from_env(env),
            self.holder,
            self.metrics,
            reuse_port=True,
            tracing=tracing_from_env(env),
            access_log=AccessLog.from_env(env),
        )

    def apply(self, message: dict[str, Any]) -> None:
        config = ShardConfig.model_validate(message["config"])
        discovered = {
            group: [DiscoveredPod(host, port, PodState(state), name) for host, port, state, name in pods]
            for group, pods in message["pods"].items()
        }
        self.holder.swap(self.builder.build(config, discovered))

    def metrics_reply(self) -> dict[str, Any]:
        topology = self.holder.current
        pods: list[Pod] = [p for g in topology.groups.values() for p in g.pods] if topology else []
        return {
            "op": "metrics",
            "data": self.metrics.snapshot(),
            "pods": [[p.group, p.address, *self.data.pod_stats(p)] for p in pods],
        }


async def worker_main() -> int:
    loop = asyncio.get_running_loop()
    env = os.environ
    listen = parse_host_port(env["SHARDGATE_LISTEN"])
    worker = Worker(listen, env)

    reader = asyncio.StreamReader(limit=MESSAGE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # The kernel hands a listening SO_REUSEPORT socket its share of new connections at once:
    # bind only with the topology in hand, or every one of them would get 503 not_ready.
    first = await reader.readline()
    if not first:
        return 0
    message = json.loads(first)
    if message.get("op") == "topology":
        worker.apply(message)
    await worker.data.start()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def say(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    stop_grace: float | None = None
    terminated = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    say({"op": "ready", "pid": os.getpid()})
    while stop_grace is None:
        read = asyncio.ensure_future(reader.readline())
        stop = asyncio.ensure_future(terminated.wait())
        await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            read.cancel()
            stop_grace = float(env.get("SHARDGATE_GRACE_TIMEOUT") or 20)
            break
        stop.cancel()
        line = read.result()
        if not line:  # the supervisor is gone: drain and leave
            stop_grace = float(env.get("SHARDGATE_GRACE_TIMEOUT") or 20)
            break
        message = json.loads(line)
        op = message.get("op")
        if op == "topology":
            worker.apply(message)
        elif op == "metrics":
            say({**worker.metrics_reply(), "id": message.get("id")})
        elif op == "drain":
            worker.data.begin_drain()
        elif op == "stop":
            stop_grace = float(message.get("grace", 20))
    await worker.data.stop(stop_grace)
    return 0


class _WorkerTag(logging.Filter):
    """Adds ``worker`` to every record, so JSON logs say which worker wrote them."""

    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def main() -> int:
    env = os.environ
    # stdout is the pipe to the supervisor: logs go to stderr. The supervisor checked the values.
    configure_logging(env.get("SHARDGATE_LOG_LEVEL", "INFO").upper(), log_format(env), sys.stderr)
    # On the handler: a logger's own filters do not see records from its child loggers.
    tag = _WorkerTag(env.get("SHARDGATE_WORKER_INDEX", "?"))
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(worker_main())


if __name__ == "__main__":
    raise SystemExit(main())
