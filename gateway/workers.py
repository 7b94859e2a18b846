"""``--workers N``: N data-plane processes on one port (SO_REUSEPORT) under one supervisor.

The supervisor owns everything that must exist once per replica: the config source and the
Kubernetes watches, the topology, the admin server and the lifecycle. Workers own only a data
plane. The supervisor sends each worker every new topology (the config plus the pods
discovery found), so all workers route with the same epoch and the API server sees one set
of watches per replica. ``/metrics`` asks every worker for its counters and adds them up;
``/readyz`` is 200 only while every worker is up. Messages are JSON lines on the worker's
stdin/stdout (``gateway.ipc``); the first one carries the worker's settings, flags included,
so a worker reads no SHARDGATE_* variable. A worker builds a new ring in a thread, as the
single process does, and keeps serving the snapshot in force meanwhile. On SIGTERM, or when
its stdin closes (the supervisor died), a worker stops accepting, lets in-flight requests
finish up to the grace timeout and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop
from pydantic import ValidationError

from gateway.admin import AdminApp, AdminServer
from gateway.control import ControlPlane
from gateway.ipc import (
    FROM_WORKER,
    TO_WORKER,
    Applied,
    Drain,
    FromWorkerMessage,
    MetricsReply,
    MetricsRequest,
    ReadState,
    Ready,
    Start,
    Stop,
    TopologyUpdate,
)
from gateway.observability.logs import AccessLog, configure_logging
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import shutdown as shutdown_tracing
from gateway.observability.tracing import tracing_from_env
from gateway.proxy.plane import BarrierReports, DataPlane
from gateway.ring import ShardRing
from gateway.settings import Settings, default_of
from gateway.topology import (
    EJECTED,
    HEALTHY,
    TRIAL,
    Handoff,
    Pod,
    Topology,
    TopologyBuilder,
    TopologyHolder,
    health_of,
)

log = logging.getLogger("shardgate.workers")

MESSAGE_LIMIT = 64 * 1024 * 1024  # a topology of thousands of pods is a few hundred KB
RESTART_DELAY_MAX = 5.0
SCRAPE_TIMEOUT = 2.0


class WorkerProcess:
    """The supervisor's handle on one worker."""

    def __init__(
        self,
        index: int,
        proc: asyncio.subprocess.Process,
        on_applied: Callable[[], None],
        on_read_state: Callable[[], None],
    ) -> None:
        self.index = index
        self.proc = proc
        self.ready = False
        self.epoch: str | None = None  # the epoch it reported routing with (metrics replies)
        self.applied: Applied | None = None  # its last report for the hand-off's barrier
        self._on_applied = on_applied
        self._on_read_state = on_read_state
        self.started = time.time()
        self._replies: dict[int, asyncio.Future[MetricsReply]] = {}
        self._ids = 0
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, message: Start | TopologyUpdate | MetricsRequest | Drain | Stop) -> None:
        """Queue ``message`` on the worker's stdin (written in order; nothing waits for it)."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(message.encode())

    async def ask_metrics(self, timeout: float) -> MetricsReply | None:
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[MetricsReply] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        try:
            self.send(MetricsRequest(id=ident))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._replies.pop(ident, None)

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line over MESSAGE_LIMIT: dropped by the reader
                log.warning("worker %d sent a line over %d bytes; ignored", self.index, MESSAGE_LIMIT)
                continue
            if not line:
                break
            try:
                message = FROM_WORKER.validate_json(line)
            except ValidationError as exc:
                log.warning(
                    "worker %d sent a message that is none of ours (%s): %r",
                    self.index,
                    _first_error(exc),
                    line[:200],
                )
                continue
            if isinstance(message, Ready):
                self.ready = True
            elif isinstance(message, Applied):
                self.applied = message
                self._on_applied()
            elif isinstance(message, ReadState):
                self._on_read_state()
            else:
                self.epoch = message.epoch
                future = self._replies.get(message.id)
                if future is not None and not future.done():
                    future.set_result(message)
        self.ready = False
        self.applied = None  # a dead worker routes nothing and has nothing in flight
        self._on_applied()


def replica_report(reports: list[Applied | None]) -> tuple[int | None, int]:
    """The replica's report for the hand-off's barrier from its workers' (None: one that has
    not said yet): the oldest generation any of them routes on (None unless all said one), and
    all their moving writes in flight."""
    generations = [r.generation if r is not None else None for r in reports]
    known = [g for g in generations if g is not None]
    oldest = min(known) if known and len(known) == len(generations) else None
    return oldest, sum(r.moving_in_flight for r in reports if r is not None)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(line)"
    return f"{where}: {error['msg']}"


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
        self._pod_health: dict[tuple[str, str], list[str]] = {}  # what the workers distrust
        self._last_counters: dict[int, dict[str, Any]] = {}  # worker index -> last snapshot
        self._retired = Metrics()  # counters of workers that died, still part of the sums
        self._monitors: list[asyncio.Task[None]] = []

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.control.load_initial()
        # Workers take their settings from us; tracing they read from the OTEL_* environment
        # they inherit: check it before starting any of them.
        shutdown_tracing(tracing_from_env(os.environ))
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
            pod_health=self._health_of,
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
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
            limit=MESSAGE_LIMIT,
        )
        worker = WorkerProcess(index, proc, self._report_workers, self.control.read_state_soon)
        topology = self.control.current
        # The worker's settings are ours (flags included), on the port reserved for all workers.
        # It binds only once it has read this; from here on it gets every topology swapped in
        # (no await between reading the current one and joining the broadcast list).
        settings = self.settings.model_copy(update={"listen": self._listen})
        update = TopologyUpdate.of(topology) if topology is not None else None
        worker.send(Start(index=index, settings=settings, topology=update))
        self.workers[index] = worker
        return worker

    def _report_workers(self) -> None:
        reports = [w.applied for w in self.workers if w is not None and w.proc.returncode is None]
        self.control.report(*replica_report(reports))

    def _broadcast(self, topology: Topology) -> None:
        message = TopologyUpdate.of(topology)
        for worker in self.workers:
            if worker is not None:
                worker.send(message)

    # -- admin hooks ---------------------------------------------------------------------------

    def _not_ready_reason(self) -> str | None:
        down = [i for i, w in enumerate(self.workers) if w is None or not w.ready]
        return f"workers not ready: {down}" if down else None

    async def _gather_metrics(self) -> None:
        """Sum the workers' counters. A worker that does not answer in time counts with its
        last answer, and a dead worker's last answer stays in the sum (``_retired``), so the
        summed counters never go down, which Prometheus would take for a reset."""
        live = [w for w in self.workers if w is not None and w.ready]
        replies = await asyncio.gather(*(w.ask_metrics(SCRAPE_TIMEOUT) for w in live))
        for worker, reply in zip(live, replies, strict=True):
            if reply is not None:
                self._last_counters[worker.index] = reply.data
        self.metrics.reset_data_plane()
        self.metrics.merge(self._retired.snapshot())
        for snapshot in self._last_counters.values():
            self.metrics.merge(snapshot)
        pod_stats: dict[tuple[str, str], tuple[int, int, int]] = {}
        for reply in replies:
            if reply is None:
                continue
            for group, address, *stats in reply.pods:
                before = pod_stats.get((group, address), (0, 0, 0))
                pod_stats[(group, address)] = (
                    before[0] + stats[0],
                    before[1] + stats[1],
                    before[2] + stats[2],
                )
        self._pod_stats = pod_stats
        pod_health: dict[tuple[str, str], list[str]] = {}
        for reply in replies:
            for key, health in (reply.health if reply is not None else {}).items():
                group, address = key.split(" ", 1)
                pod_health.setdefault((group, address), []).append(health)
        self._pod_health = pod_health
        self.metrics.workers_ready = sum(1 for w in self.workers if w is not None and w.ready)

    def _health_of(self, pod: Pod) -> dict[str, object]:
        """A pod's passive health as the workers saw it at the last scrape: ``ejected`` if one
        of them ejected it (each ejects on what its own requests meet), with how many did."""
        seen = self._pod_health.get((pod.group, pod.address), [])
        health = EJECTED if EJECTED in seen else TRIAL if TRIAL in seen else HEALTHY
        return {
            "health": health,
            "workers_ejected": seen.count(EJECTED),
            "workers_on_trial": seen.count(TRIAL),
        }

    def _describe_workers(self) -> list[dict[str, object]]:
        return [
            {
                "index": i,
                "pid": w.proc.pid if w else None,
                "ready": bool(w and w.ready),
                "epoch": w.epoch if w else None,  # as of its last metrics reply
            }
            for i, w in enumerate(self.workers)
        ]

    # -- stop ----------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        self.draining = True
        for worker in self.workers:
            if worker is not None:
                worker.send(Drain())

    async def stop(self) -> None:
        """Every worker drains (stops accepting, finishes in-flight requests up to the grace
        timeout); the supervisor waits for all of them, then stops itself."""
        self.draining = True
        self.stopping = True
        grace = self.settings.grace_timeout
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            worker.send(Stop(grace=grace))
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


class TopologyUpdates:
    """Applies topology messages in the order received, without stalling the event loop.

    A message that keeps the ring (pods, routing) is applied at once, on the loop (a snapshot of
    64 groups x 16 pods takes ~2 ms). For one that changes the ring, the ring is built in a
    thread first (~0.15 s at 64 groups) while the current snapshot keeps serving. Messages that
    arrive meanwhile wait, and only the newest of them is applied (each message is a whole
    topology, so it supersedes the ones before): with the ring just built if that ring is its
    ring too, else after building its own.
    """

    def __init__(self, builder: TopologyBuilder, holder: TopologyHolder) -> None:
        self._builder = builder
        self._holder = holder
        self._waiting: TopologyUpdate | None = None
        self._building: asyncio.Task[None] | None = None
        self._applied: TopologyUpdate | None = None  # the last one swapped in
        self.rings_built_off_loop = 0

    @property
    def building(self) -> bool:
        return self._building is not None

    def submit(self, update: TopologyUpdate) -> None:
        applied = self._applied
        if self._building is None and applied is not None and update.unconfirmed != applied.unconfirmed:
            if update == applied.model_copy(update={"unconfirmed": update.unconfirmed}):
                # Only the supervisor's lease changed: at once, without building anything
                # (during a hand-off even a quick update rebuilds the incoming ring).
                self._applied = update
                self._holder.set_confirmed(not update.unconfirmed)
                return
        quick = not self._builder.needs_ring(update.config) and update.incoming is None
        if self._building is None and quick:
            self._swap(update, None)
            return
        self._waiting = update
        if self._building is None:
            self._building = asyncio.get_running_loop().create_task(self._build_then_swap())

    def apply_now(self, update: TopologyUpdate) -> None:
        """Before the worker serves anything: build whatever it takes right here."""
        self._swap(update, None, update.handoff())

    async def settled(self) -> None:
        """Return once every message submitted so far is applied."""
        while self._building is not None:
            await asyncio.shield(self._building)

    async def _build_then_swap(self) -> None:
        try:
            while (update := self._waiting) is not None:
                ring = None
                if self._builder.needs_ring(update.config):
                    ring = await asyncio.to_thread(ShardRing, update.config)
                    self.rings_built_off_loop += 1
                    newest = self._waiting
                    if newest is not update:
                        assert newest is not None  # only this task clears it
                        if not TopologyBuilder.same_ring(newest.config, update.config):
                            continue  # superseded by a topology with another ring (or the old one)
                        update = newest
                self._waiting = None
                # A hand-off's other config has a ring of its own, built off the loop too.
                handoff = await asyncio.to_thread(update.handoff) if update.incoming is not None else None
                if self._waiting is not None and self._waiting.incoming != update.incoming:
                    continue  # superseded meanwhile by a message for another hand-off (or none)
                self._swap(update, ring, handoff)
        except Exception:  # the snapshot in force stays; the next message may fare better
            log.exception("could not apply a topology")
            self._waiting = None
        finally:
            self._building = None

    def _swap(self, update: TopologyUpdate, ring: ShardRing | None, handoff: Handoff | None = None) -> None:
        topology = self._builder.build(
            update.config, update.pods, ring, generation=update.generation, handoff=handoff
        )
        self._holder.note_unconfirmed(update.unconfirmed)  # the supervisor's lease, stamped on it
        self._holder.swap(topology)
        self._applied = update


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.holder = TopologyHolder(log_changes=False)  # the supervisor logs epoch changes once
        self.builder = TopologyBuilder()
        self.updates = TopologyUpdates(self.builder, self.holder)
        self.data = DataPlane(
            settings.listen,
            settings.limits,
            self.holder,
            self.metrics,
            reuse_port=True,
            tracing=tracing_from_env(os.environ),  # OTEL_*, inherited from the supervisor
            access_log=AccessLog(settings.access_log, settings.slow_request_seconds),
            read_state_soon=self._ask_for_state,
            limit_share=settings.workers,
        )
        self.say: Callable[[FromWorkerMessage], None] | None = None  # set once stdout is open
        self._applied: Applied | None = None
        self.reports = BarrierReports(self.data.moving_writes_in_flight, self.holder, self._report)

    def _report(self, generation: int | None, moving_in_flight: int) -> None:
        applied = Applied(generation=generation, moving_in_flight=moving_in_flight)
        if applied != self._applied:
            self._applied = applied
            if self.say is not None:
                self.say(applied)

    def _ask_for_state(self) -> None:
        if self.say is not None:
            self.say(ReadState())

    def talk_through(self, say: Callable[[FromWorkerMessage], None]) -> None:
        """Messages to the supervisor go through ``say`` from now on; the last report first."""
        self.say = say
        say(Ready(pid=os.getpid()))
        if self._applied is not None:
            say(self._applied)

    def metrics_reply(self, ident: int) -> MetricsReply:
        topology = self.holder.current
        pods: list[Pod] = [p for g in topology.groups.values() for p in g.pods] if topology else []
        return MetricsReply(
            id=ident,
            epoch=topology.epoch if topology else None,
            data=self.metrics.snapshot(),
            pods=[(p.group, p.address, *self.data.pod_stats(p)) for p in pods],
            health={f"{p.group} {p.address}": health_of(p) for p in pods if health_of(p) != HEALTHY},
        )

    async def serve(self, reader: asyncio.StreamReader, say: Callable[[FromWorkerMessage], None]) -> float:
        """Handle the supervisor's messages until told to stop, SIGTERM, or the supervisor is
        gone (stdin closed); returns the grace timeout to stop with."""
        terminated = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, terminated.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
        stop = asyncio.ensure_future(terminated.wait())
        try:
            while True:
                read = asyncio.ensure_future(_read_line(reader))
                await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    log.info("SIGTERM: stopping")
                    return self.settings.grace_timeout
                line = read.result()
                if line is None:
                    continue
                if not line:
                    log.warning("the supervisor is gone: stopping")
                    return self.settings.grace_timeout
                message = _parse(line)
                if isinstance(message, TopologyUpdate):
                    self.updates.submit(message)
                elif isinstance(message, MetricsRequest):
                    say(self.metrics_reply(message.id))
                elif isinstance(message, Drain):
                    self.data.begin_drain()
                elif isinstance(message, Stop):
                    return self.settings.grace_timeout if message.grace is None else message.grace
                elif message is not None:
                    log.warning("ignoring a second %r message", message.op)
        finally:
            stop.cancel()


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line (b"" at EOF), or None for one over MESSAGE_LIMIT (dropped)."""
    try:
        return await reader.readline()
    except ValueError:
        log.warning("the supervisor sent a line over %d bytes; ignored", MESSAGE_LIMIT)
        return None


def _parse(line: bytes) -> Start | TopologyUpdate | MetricsRequest | Drain | Stop | None:
    try:
        return TO_WORKER.validate_json(line)
    except ValidationError as exc:
        log.warning("ignoring a message that is none of ours (%s): %r", _first_error(exc), line[:200])
        return None


async def _wait_for_start(reader: asyncio.StreamReader) -> Start | None:
    """The supervisor's first message (others before it are logged and skipped); None at EOF."""
    while (line := await _read_line(reader)) != b"":
        message = _parse(line) if line is not None else None
        if isinstance(message, Start):
            return message
        if message is not None:
            log.warning("ignoring %r before the start message", message.op)
    return None


async def worker_main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MESSAGE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    start = await _wait_for_start(reader)
    if start is None:
        return 0
    settings = start.settings
    _configure_logging(settings.log_level, settings.log_format, str(start.index))
    worker = Worker(settings)
    # The kernel hands a listening SO_REUSEPORT socket its share of new connections at once:
    # bind only with the topology in hand, or every one of them would get 503 not_ready.
    if start.topology is not None:
        worker.updates.apply_now(start.topology)
    await worker.data.start()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def say(message: FromWorkerMessage) -> None:
        writer.write(message.encode())

    worker.talk_through(say)
    grace = await worker.serve(reader, say)
    await worker.data.stop(grace)
    return 0


class _WorkerTag(logging.Filter):
    """Adds ``worker`` to every record, so JSON logs say which worker wrote them."""

    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _configure_logging(level: str, fmt: str, index: str) -> None:
    # stdout is the pipe to the supervisor: logs go to stderr.
    configure_logging(level, fmt, sys.stderr)
    # On the handler: a logger's own filters do not see records from its child loggers.
    tag = _WorkerTag(index)
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


def main() -> int:
    # Until the start message brings the supervisor's settings: the defaults.
    _configure_logging(default_of("log_level"), default_of("log_format"), "?")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(worker_main())


if __name__ == "__main__":
    raise SystemExit(main())
