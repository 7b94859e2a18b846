"""The hand-off harness of issue 14 ("How it must be shown"; docs/design/014-ownership-handoff.md).

    .venv/bin/python -m tests.handoff.harness --mode fenced|immediate [--report PATH]
        [--rate 500] [--users 2000]

The scene: the API-server double (``tests.k8s.apiserver.FakeApiServer``); 3 gateway replicas
(``python -m gateway run --configmap``, each with its own token and identity, watch events
delayed 0, 2.5 and 5 s); 5 shard groups x 2 fenced backend pods (``tests.handoff.backend``
processes, each with its own token; 4 groups named at first, group-5 only later), each pod
alone in an EndpointSlice of its group's Service; a load process (``tests.handoff.load``)
sending ``--rate`` writes/s over ``--users`` users round robin through the replicas.

Fenced (``fenced_sequence``): add group-5 with replica 1 cut off from the API server for 4 s
in its fence phase; remove group-4 with its pod group-4-a cut off for 5 s and replica 2
restarted in the fence phase; reweight group-3 with the leader SIGKILLed in its fence phase
(another replica takes the leader Lease over and commits; the killed one is started again with
its identity); then reweight group-5 (pod group-3-a SIGSTOPped for 3 s in its fence phase) and,
5 s after it, add group-4 back. Each change waits for the hand-off to end (stable state with the
desired config), except the last pair. Immediate (``immediate_sequence``, the negative
control): ``handoff: {mode: immediate}``, four changes, no faults.

The report (JSON) judges the run on the backends' records and the client's (``check``). The
requests the client had in flight on a killed replica, or sent to it before it was taken out of
rotation, get no HTTP answer: they are counted apart (``killed_replica_connection_errors``) and
are the only requests left out of criteria 3 and 4 (``Outage``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.coordination.registry import report_of
from gateway.fence import STATE_PATH
from gateway.handoff import Report
from gateway.shardstate import Phase, ShardState, state_configmap_name
from tests.k8s.apiserver import FakeApiServer, endpoint, port
from tests.k8s.conftest import CONFIGMAP, NS, REPO_ROOT, GatewayFactory, GatewayProcess, Group, Recipe
from tests.k8s.conftest import shard_config as base_shard_config
from tests.support import wait_until

STATE_CONFIGMAP = state_configmap_name(CONFIGMAP)
LEADER_LEASE = f"{CONFIGMAP}-leader"  # coordination.k8s.io: the replica that drives hand-offs
WATCH_DELAYS = (0.0, 2.5, 5.0)  # per gateway replica
# Per group: (watch delay, seconds between the fence's confirmation reads) of its pods. The pods
# of group-1 and group-2 lag (as pods on a slow node would; still well inside their lease):
# what gives the negative control pods that disagree. The faults pick pods that do not lag.
LAGGING = {"group-1": (4.0, 4.0), "group-2": (4.0, 4.0)}
PROMPT = (0.0, 1.0)
LEASE = 8.0  # fence_lease_seconds: a silent participant costs 2 x 8 + 2.08 s
BARRIER_TIMEOUT = 40.0
HOLD = 2.0
POD_CUT = 5.0  # seconds a backend pod is cut off from the API server
# Seconds replica 1 is cut off from the API server: below its own view lease (LEASE), past which
# it would refuse every write (503 shard_state_unconfirmed), unmoved users' too. Its last
# confirming read may be one confirmation interval (min(LEASE / 6, 10 s) = 1.33 s) old when the
# cut begins and its first read after the heal up to one interval late, so the cut must stay
# below LEASE - 2 x 1.33 = 5.3 s; 4 s leaves more than a second for the reads themselves.
REPLICA_CUT = 4.0
TAKEOVER_TIMEOUT = 40.0  # the leader Lease (15 s) runs out and another candidate takes it by then
POD_PAUSE = 3.0  # seconds a backend pod is SIGSTOPped
SETTLE_TIMEOUT = 90.0  # a hand-off (even one waiting out a silent participant) ends by then
ALL_GROUPS = ("group-1", "group-2", "group-3", "group-4", "group-5")


def log(message: str) -> None:
    print(f"[harness {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Configs


def config_text(weights: dict[str, int], mode: str) -> str:
    document = yaml.safe_load(base_shard_config([Group(n, f"svc-{n}", w) for n, w in weights.items()]))
    document["handoff"] = handoff_section(mode)
    return yaml.safe_dump(document, sort_keys=False)


def handoff_section(mode: str) -> dict[str, Any]:
    """Fenced: a short lease (a silent participant costs 2 x LEASE + margin, not two minutes).
    Immediate: ``{mode: immediate}`` and nothing else, the defaults of every other field (a
    60 s lease: the replicas re-read the state every 10 s, so their watch delays show)."""
    if mode == "immediate":
        return {"mode": "immediate"}
    return {
        "mode": mode,
        "fence_lease_seconds": LEASE,
        "barrier_timeout_seconds": BARRIER_TIMEOUT,
        "hold_seconds": HOLD,
    }


def weights_of(text: str) -> dict[str, int]:
    return {g["name"]: int(g.get("weight", 1)) for g in yaml.safe_load(text)["groups"]}


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Backend:
    group: str
    name: str  # "group-1-a"
    token: str
    records: Path
    proc: subprocess.Popen[bytes]
    port: int = 0
    paused: bool = False

    def stop(self) -> None:
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Replica:
    index: int
    identity: str
    token: str
    kubeconfig: Path
    gateway: GatewayProcess


@dataclass(frozen=True)
class Outage:
    """Replica ``replica`` SIGKILLed at ``killed_at`` and out of the load's rotation from
    ``out_of_rotation_at`` (``time.monotonic()``). What the client had in flight on it then, and
    what it sent to it meanwhile, got no HTTP answer (status -1): requests lost with the
    process, as they are behind an Ingress until the pod's readiness fails. Only those are
    left out of the criteria on answers."""

    replica: int
    identity: str
    killed_at: float
    out_of_rotation_at: float

    def hit(self, row: dict[str, Any]) -> bool:
        """The request was in flight on the replica when it was killed (by the client's clock,
        which sees an answer a moment late), or sent to it after."""
        return bool(
            row["replica"] == self.replica
            and row["end"] >= self.killed_at
            and row["start"] <= self.out_of_rotation_at
        )

    def lost(self, row: dict[str, Any]) -> bool:
        return row["status"] == -1 and self.hit(row)


@dataclass
class StateSeen:
    at: float  # time.monotonic() when the harness saw it
    state: ShardState


@dataclass
class Scene:
    mode: str
    directory: Path
    rate: float
    users: int
    api: FakeApiServer = field(default_factory=FakeApiServer)
    backends: dict[str, Backend] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    states: list[StateSeen] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    failover: dict[str, Any] = field(default_factory=dict)  # the leader failover's figures
    factory: GatewayFactory | None = None
    load: subprocess.Popen[bytes] | None = None
    control_seq: int = 0
    _stop_polling: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None

    # -- events ---------------------------------------------------------------------------

    def event(self, what: str, **details: Any) -> None:
        self.events.append({"at": time.monotonic(), "what": what, **details})
        log(what + (f" {details}" if details else ""))

    # -- backends -------------------------------------------------------------------------

    def start_backend(self, group: str, suffix: str) -> Backend:
        name = f"{group}-{suffix}"
        token = f"pod-{name}"
        self.api.add_token(token)
        delay, confirm = LAGGING.get(group, PROMPT)
        if delay:
            self.api.set_watch_delay(token, delay)
        kubeconfig = self.api.kubeconfig(self.directory / f"kubeconfig-{name}", namespace=NS, token=token)
        records = self.directory / f"records-{name}.jsonl"
        port_file = self.directory / f"port-{name}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDGATE_", "KUBERNETES_"))}
        env.update({"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"})
        with open(self.directory / f"backend-{name}.log", "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.handoff.backend",
                    "--configmap",
                    CONFIGMAP,
                    "--namespace",
                    NS,
                    "--group",
                    group,
                    "--pod",
                    name,
                    "--records",
                    str(records),
                    "--port-file",
                    str(port_file),
                    "--confirm-interval",
                    str(confirm),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        backend = Backend(group, name, token, records, proc)
        self.backends[name] = backend
        return backend

    def publish_backend(self, backend: Backend) -> None:
        port_file = self.directory / f"port-{backend.name}"
        ok = wait_until(lambda: port_file.exists() or backend.proc.poll() is not None, 30, 0.05)
        if not ok or backend.proc.poll() is not None:
            raise RuntimeError(f"backend {backend.name} did not start: see {self.directory}")
        backend.port = int(port_file.read_text())
        self.api.put_endpointslice(
            NS,
            f"svc-{backend.group}-{backend.name}",
            f"svc-{backend.group}",
            [endpoint("127.0.0.1", pod=backend.name)],
            [port(backend.port, "http")],
        )

    # -- gateways -------------------------------------------------------------------------

    def start_replica(self, index: int) -> Replica:
        assert self.factory is not None
        identity, token = f"gw-{index}", f"gateway-{index}"
        self.api.add_token(token)
        if WATCH_DELAYS[index]:
            self.api.set_watch_delay(token, WATCH_DELAYS[index])
        kubeconfig = self.api.kubeconfig(self.directory / f"kubeconfig-{identity}", namespace=NS, token=token)
        gateway = self.factory(
            watch_timeout=30.0,
            env={
                "KUBECONFIG": str(kubeconfig),
                "SHARDGATE_IDENTITY": identity,
                "SHARDGATE_LOG_LEVEL": "INFO",
            },
        )
        return Replica(index, identity, token, kubeconfig, gateway)

    def restart_replica(self, index: int) -> None:
        """Out of rotation (nothing in flight on it), stopped, started again with its identity."""
        self.control(down={index})
        self.replicas[index].gateway.stop()
        self.start_again(index)

    def kill_replica(self, index: int) -> Outage:
        """SIGKILL (no drain, nothing released: a crash, a lost node), then out of the load's
        rotation at once, as an Ingress takes a pod out whose readiness fails."""
        assert self.factory is not None
        gateway = self.replicas[index].gateway
        killed_at = time.monotonic()  # before the signal: every request it breaks ends after
        gateway.proc.kill()
        gateway.proc.wait(10)
        self.factory.started.remove(gateway)  # (not "died during the test": killed on purpose)
        self.control(down={index})  # returns once nothing is in flight on it
        outage = Outage(index, self.replicas[index].identity, killed_at, time.monotonic())
        self.outages.append(outage)
        return outage

    def start_again(self, index: int) -> None:
        """Replica ``index`` (stopped or killed) started again with its identity, in rotation."""
        assert self.factory is not None
        old = self.replicas[index]
        if old.gateway in self.factory.started:
            self.factory.started.remove(old.gateway)
        self.replicas[index] = self.start_replica(index)
        self.control(down=set())

    def control(self, down: set[int]) -> None:
        """Tell the load process which replicas to use; wait until it has nothing in flight on
        the ones taken out."""
        self.control_seq += 1
        seq = self.control_seq
        doc = {"seq": seq, "ports": [r.gateway.port for r in self.replicas], "down": sorted(down)}
        path = self.directory / "control.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
        if self.load is None:
            return
        ack = self.directory / "ack.json"

        def drained() -> bool:
            try:
                got = json.loads(ack.read_text())
            except (OSError, ValueError):
                return False
            return bool(got["seq"] == seq and all(got["inflight"].get(str(i), 0) == 0 for i in down))

        if not wait_until(drained, 30, 0.02):
            raise RuntimeError("the load process did not take the replica out of rotation")

    # -- the Leases -----------------------------------------------------------------------------

    def leader_holder(self) -> str | None:
        """The holder of the leader Lease, as the API server has it (None: none, or released)."""
        lease = self.api.get_object("leases", NS, LEADER_LEASE) or {}
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return str(holder) if holder else None

    def replica_report(self, identity: str) -> Report:
        """What replica ``identity``'s Lease reports, as the leader's barrier reads it."""
        lease = self.api.get_object("leases", NS, f"{CONFIGMAP}-replica-{identity}") or {}
        return report_of((lease.get("metadata") or {}).get("annotations") or {})

    def index_of(self, identity: str) -> int:
        return next(r.index for r in self.replicas if r.identity == identity)

    # -- the shard state ----------------------------------------------------------------------

    def _poll_states(self) -> None:
        last = None
        while not self._stop_polling.is_set():
            obj = self.api.get_object("configmaps", NS, STATE_CONFIGMAP)
            text = (obj or {}).get("data", {}).get("state.json")
            if text is not None and text != last:
                last = text
                self.states.append(StateSeen(time.monotonic(), ShardState.from_json(text)))
            self._stop_polling.wait(0.02)

    def state(self) -> ShardState | None:
        return self.states[-1].state if self.states else None

    def wait_fencing(self, after: int, timeout: float = 30.0) -> bool:
        def fencing() -> bool:
            s = self.state()
            return s is not None and s.generation > after and s.next is not None

        return wait_until(fencing, timeout, 0.02)

    def wait_stable(self, desired: str, timeout: float = SETTLE_TIMEOUT) -> ShardState:
        def settled() -> bool:
            s = self.state()
            return s is not None and s.next is None and s.config == desired

        if not wait_until(settled, timeout, 0.05):
            raise RuntimeError(f"no stable state with the desired config within {timeout}s: {self.state()}")
        state = self.state()
        assert state is not None
        return state

    def wait_replicas_at(self, generation: int, timeout: float = 30.0) -> None:
        def caught_up() -> bool:
            try:
                return all(
                    (r.gateway.ring()["config"]["generation"] or 0) >= generation for r in self.replicas
                )
            except (OSError, AssertionError, KeyError, ValueError):
                return False

        if not wait_until(caught_up, timeout, 0.1):
            self.event("replicas not all at generation", generation=generation)

    def wait_backends_at(self, generation: int, timeout: float = 30.0) -> None:
        """Every fence holds a confirmed view of ``generation`` or later (asked without
        ``?generation=``, which would make it read the state at once)."""

        def fence_at(backend: Backend) -> bool:
            url = f"http://127.0.0.1:{backend.port}{STATE_PATH}"
            try:
                with urllib.request.urlopen(url, timeout=2.0) as answer:
                    doc = json.loads(answer.read())
            except (OSError, ValueError):
                return False
            return bool(doc.get("confirmed") and (doc.get("generation") or 0) >= generation)

        if not wait_until(lambda: all(fence_at(b) for b in self.backends.values()), timeout, 0.1):
            raise RuntimeError(f"not every fence holds generation {generation} within {timeout}s")

    def put_config(self, weights: dict[str, int]) -> str:
        text = config_text(weights, self.mode)
        self.api.put_configmap(NS, CONFIGMAP, {"shards.yaml": text})
        return text

    def phase(self) -> str:
        s = self.state()
        return f"{s.generation}:{s.phase}" if s is not None else "none"

    def generation(self) -> int:
        s = self.state()
        return s.generation if s is not None else 0

    # -- the whole scene ------------------------------------------------------------------------

    def start(self, initial: dict[str, int]) -> str:
        self.api.start()
        self.factory = GatewayFactory(self.api, self.directory)
        started = [self.start_backend(g, s) for g in ALL_GROUPS for s in ("a", "b")]
        for backend in started:
            self.publish_backend(backend)
        desired = self.put_config(initial)
        self._poller = threading.Thread(target=self._poll_states, name="state-poller", daemon=True)
        self._poller.start()
        self.replicas = [self.start_replica(i) for i in range(len(WATCH_DELAYS))]
        self.wait_stable(desired, 60)
        self.wait_replicas_at(self.generation())
        self.wait_backends_at(self.generation())
        self.control(down=set())
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
        d = self.directory
        with open(d / "load.log", "wb") as out:
            self.load = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.handoff.load",
                    *("--control", str(d / "control.json"), "--ack", str(d / "ack.json")),
                    *("--out", str(d / "client.jsonl"), "--rate", str(self.rate), "--users", str(self.users)),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.control(down=set())  # returns once the load process read it
        self.event("load started", rate=self.rate, users=self.users)
        return desired

    def stop_load(self) -> list[dict[str, Any]]:
        assert self.load is not None
        self.load.send_signal(signal.SIGTERM)
        self.load.wait(90)
        self.event("load stopped")
        return read_jsonl(self.directory / "client.jsonl")

    def gateway_figures(self) -> list[dict[str, Any]]:
        figures = []
        for r in self.replicas:
            g = r.gateway
            try:
                handoff = g.ring()["config"]["handoff"]
                figures.append(
                    {
                        "replica": r.index,
                        "identity": r.identity,
                        "leader": handoff.get("leader"),
                        "generation": g.ring()["config"]["generation"],
                        "handoffs_committed": g.metric("shardgate_handoffs_total", outcome="committed"),
                        "handoffs_rolled_back": g.metric("shardgate_handoffs_total", outcome="rolled_back"),
                        "handoff_fence_seconds_total": g.metric("shardgate_handoff_fence_seconds_total"),
                        "barrier_held_by": handoff.get("barrier_held_by"),
                        "held_writes": {
                            o: g.metric("shardgate_held_writes_total", outcome=o) for o in ("sent", "refused")
                        },
                        "fenced_writes": {
                            o: g.metric("shardgate_fenced_writes_total", outcome=o)
                            for o in ("resent", "held", "refused")
                        },
                    }
                )
            except (OSError, AssertionError, KeyError, ValueError) as exc:
                figures.append({"replica": r.index, "error": repr(exc)})
        return figures

    def close(self) -> None:
        self._stop_polling.set()
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait(5)
        if self.factory is not None:
            for problem in self.factory.close():
                log(problem)
        for backend in self.backends.values():
            backend.stop()
        self.api.stop()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))  # a pod killed mid-line leaves at most one partial line
    return rows


# ---------------------------------------------------------------------------------------------
# The sequences


def pause_until(moment: float) -> None:
    """Let the scene run (the load, the hand-off) until ``moment``: a fault's duration."""
    wait_until(lambda: time.monotonic() >= moment, max(0.0, moment - time.monotonic()) + 1.0, 0.02)


def cut_off_for(scene: Scene, token: str, seconds: float, who: str) -> threading.Timer:
    """Cut client ``token`` off from the API server now, and heal it ``seconds`` later: on time,
    whatever the sequence does meanwhile (a restart, a wait). Join the timer returned."""
    scene.api.cut_off(token)
    scene.event(f"fault: {who} cut off from the API server", seconds=seconds, phase=scene.phase())

    def reconnect() -> None:
        scene.api.cut_off(token, cut=False)
        scene.event(f"{who} reconnected", phase=scene.phase())

    heal = threading.Timer(seconds, reconnect)
    heal.start()
    return heal


def fenced_sequence(scene: Scene, weights: dict[str, int]) -> None:
    # 1. Add group-5 (its pods serve already). Replica 1 cut off from the API server as soon as
    # the fence phase is written, for REPLICA_CUT seconds (below its own lease: its unmoved
    # users see nothing). With its 2.5 s watch delay it has not seen the fence phase, and while
    # cut off it cannot report it, so the barrier waits for it to come back and report.
    g = scene.generation()
    weights = {**weights, "group-5": 1}
    desired = scene.put_config(weights)
    scene.event("change: add group-5")
    heal = None
    if scene.wait_fencing(g):
        heal = cut_off_for(scene, scene.replicas[1].token, REPLICA_CUT, "replica 1")
    scene.wait_stable(desired)
    if heal is not None:
        heal.join()
    scene.wait_replicas_at(scene.generation())

    # 2. Remove group-4. Its pod group-4-a is cut off from the API server just before (for
    # POD_CUT seconds: below its lease minus a confirmation interval, so that its own lease does
    # not run out and its users see nothing), so the barrier waits for it; meanwhile replica 2
    # is restarted (out of rotation, stopped, started again with its identity).
    g = scene.generation()
    heal = cut_off_for(scene, scene.backends["group-4-a"].token, POD_CUT, "pod group-4-a")
    weights = {k: v for k, v in weights.items() if k != "group-4"}
    desired = scene.put_config(weights)
    scene.event("change: remove group-4")
    if scene.wait_fencing(g):
        scene.event("fault: restarting replica 2", phase=scene.phase())
        scene.restart_replica(2)
        scene.event("replica 2 up again", phase=scene.phase())
    heal.join()
    scene.wait_stable(desired)
    scene.wait_replicas_at(scene.generation())

    # 3. Reweight group-3 (every other group loses keys to it). The leader dies in the fence
    # phase (``leader_failover``): another replica takes its Lease over and commits.
    g = scene.generation()
    weights = {**weights, "group-3": 2}
    desired = scene.put_config(weights)
    scene.event("change: reweight group-3 to 2")
    if scene.wait_fencing(g):
        leader_failover(scene, desired)
    scene.wait_stable(desired)
    scene.wait_replicas_at(scene.generation())

    # 4 + 5. Two changes 5 s apart: reweight group-5, then bring group-4 back. A pod of a group
    # that loses keys in the first (group-3-a) is paused (SIGSTOP) in its fence phase for
    # POD_PAUSE seconds (below its lease minus a confirmation interval).
    g = scene.generation()
    weights = {**weights, "group-5": 2}
    scene.put_config(weights)
    scene.event("change: reweight group-5 to 2")
    second_at = time.monotonic() + 5.0
    paused = scene.backends["group-3-a"]
    if scene.wait_fencing(g):
        paused.proc.send_signal(signal.SIGSTOP)
        paused.paused = True
        scene.event("fault: pod group-3-a SIGSTOPped", generation=scene.generation())
        pause_until(time.monotonic() + POD_PAUSE)
        paused.proc.send_signal(signal.SIGCONT)
        paused.paused = False
        scene.event("pod group-3-a SIGCONTed", phase=scene.phase())
    pause_until(second_at)
    weights = {**weights, "group-4": 1}
    desired = scene.put_config(weights)
    scene.event("change: add group-4 back (5 s after the previous one)", phase=scene.phase())
    scene.wait_stable(desired)
    scene.wait_replicas_at(scene.generation())


def leader_failover(scene: Scene, desired: str) -> None:
    """The fence phase is written: SIGKILL the replica holding the leader Lease (it cannot
    release it, so the others wait it out: 15 s); wait for another replica to take it over;
    start the killed one again with its identity (kept down until then, or it would simply take
    its own Lease back); the hand-off must be committed by the new leader, and the restarted
    replica report the committed generation. The figures go to ``scene.failover``.

    The new leader's barrier runs from its own T_f. The killed replica's Lease stays behind
    with its last report: if that did not show the fence phase with nothing moving in flight,
    the barrier waits for the restarted replica's report (it reads the state before it serves),
    or else for T_f + 2 x LEASE + margin (33 to 38 s after the kill: inside the 40 s deadline)."""
    fencing = scene.generation()
    killed = scene.leader_holder()
    if killed is None:
        raise RuntimeError("nobody holds the leader Lease in the fence phase")
    index = scene.index_of(killed)
    outage = scene.kill_replica(index)
    # Its Lease's last report: what the new leader's barrier reads until it is up again.
    last = scene.replica_report(killed)
    reported = {"generation": last.generation, "moving_in_flight": last.moving_in_flight}
    scene.event(f"fault: leader {killed} (replica {index}) SIGKILLed", phase=scene.phase(), reported=reported)
    if not wait_until(lambda: scene.leader_holder() not in (None, killed), TAKEOVER_TIMEOUT, 0.05):
        raise RuntimeError(f"no replica took the leader Lease over within {TAKEOVER_TIMEOUT}s")
    leader, took_over_at = scene.leader_holder(), time.monotonic()
    scene.event(
        f"leader Lease taken over by {leader}",
        after_seconds=round(took_over_at - outage.killed_at, 2),
        phase=scene.phase(),
    )
    scene.start_again(index)
    up_at = time.monotonic()
    scene.event(f"replica {index} ({killed}) up again", phase=scene.phase())
    state = scene.wait_stable(desired)
    committed_at = next(s.at for s in scene.states if s.state.generation == state.generation)
    if state.leader is None or state.leader == killed:
        raise RuntimeError(f"the hand-off was committed by {state.leader}, not by a new leader")
    new_leader = scene.replicas[scene.index_of(state.leader)].gateway
    held_by = new_leader.ring()["config"]["handoff"].get("barrier_held_by")
    scene.event(f"committed by {state.leader}", generation=state.generation, barrier_held_by=held_by)
    generation = state.generation
    if not wait_until(lambda: (scene.replica_report(killed).generation or 0) >= generation, 30, 0.1):
        raise RuntimeError(f"{killed}, started again, did not report generation {generation}")
    scene.event(f"{killed} reports generation {generation}")
    scene.failover = {
        "generation": fencing,
        "killed": killed,
        "killed_last_report": reported,
        "leader_lease_taken_over_by": leader,
        "takeover_seconds_after_kill": round(took_over_at - outage.killed_at, 2),
        "committed_by": state.leader,
        "restarted_replica_ready_seconds_after_kill": round(up_at - outage.killed_at, 2),
        "committed_seconds_after_kill": round(committed_at - outage.killed_at, 2),
        "barrier_held_by": held_by,
        "barrier_counted_the_killed_replica": counted_how(last, fencing, held_by),
        "out_of_rotation_seconds_after_kill": round(outage.out_of_rotation_at - outage.killed_at, 3),
    }


def counted_how(last: Report, fencing: int, held_by: str | None) -> str:
    """How the new leader's barrier can have counted the killed replica, from its last report
    before the kill and how the barrier held."""
    if held_by != "reports":
        return "silent deadline (2 x lease + margin)"
    if (last.generation or 0) >= fencing and last.moving_in_flight == 0:
        return "by its last report before the kill"
    return "by the report of the restarted replica"


def immediate_sequence(scene: Scene, weights: dict[str, int]) -> None:
    """The negative control: the same scene, every change switched at once, fewer changes."""
    w5 = {**weights, "group-5": 1}
    w3 = {**w5, "group-3": 2}
    w2 = {k: v for k, v in w3.items() if k != "group-2"}
    steps = [
        ("add group-5", w5),
        ("reweight group-3 to 2", w3),
        ("remove group-2", w2),
        ("add group-2 back", {**w2, "group-2": 1}),
    ]
    for what, target in steps:
        desired = scene.put_config(target)
        scene.event("change: " + what)
        scene.wait_stable(desired)
        # Long enough for the most delayed replica and pod to have switched too.
        pause_until(time.monotonic() + max(WATCH_DELAYS) + 3.0)


# ---------------------------------------------------------------------------------------------
# Judging the run


def owners_by_state(
    states: Sequence[StateSeen], users: Iterable[str]
) -> tuple[list[dict[str, str]], set[str]]:
    """The owner of every user under each config the states put in force, in generation order;
    and every user whose owner differs between any two configs named (moving at some point)."""
    texts: list[str] = []
    named: list[str] = []
    for seen in sorted(states, key=lambda s: s.state.generation):
        if seen.state.next is None and (not texts or texts[-1] != seen.state.config):
            texts.append(seen.state.config)
        named.extend(t for t in (seen.state.config, seen.state.next) if t is not None)
    users = list(users)
    recipes = {t: Recipe(weights_of(t)) for t in set(named) | set(texts)}
    sequence = [{u: recipes[t].owner(u) for u in users} for t in texts]
    all_owners = [{u: recipes[t].owner(u) for u in users} for t in set(named)]
    moving = {u for u in users if len({o[u] for o in all_owners}) > 1}
    return sequence, moving


def is_subsequence(observed: Sequence[str], expected: Sequence[str]) -> bool:
    it = iter(expected)
    return all(any(x == y for y in it) for x in observed)


def dedupe(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def in_fence_phase(states: Sequence[StateSeen], moment: float) -> bool:
    """Whether the state in force at ``moment`` (the last one the harness saw by then) was a
    fence phase."""
    current = None
    for seen in states:
        if seen.at > moment:
            break
        current = seen
    return current is not None and current.state.phase == Phase.FENCING


def check(
    client: list[dict[str, Any]],
    accepted: list[dict[str, Any]],
    states: Sequence[StateSeen],
    users: int,
    outages: Sequence[Outage] = (),
) -> dict[str, Any]:
    names = [f"user-{i:04d}" for i in range(users)]
    sequence, moving = owners_by_state(states, names)
    violations: list[dict[str, Any]] = []
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in accepted:
        by_user[str(row["user"])].append(row)

    # 1. No two writes accepted by different groups overlap in time.
    overlaps = 0
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r["start"])
        latest_end: dict[str, tuple[float, dict[str, Any]]] = {}
        for row in rows:
            for group, (end, other) in latest_end.items():
                if group != row["group"] and end > row["start"]:
                    overlaps += 1
                    if overlaps <= 20:
                        violations.append({"criterion": 1, "user": user, "writes": [other, row]})
            if row["end"] > latest_end.get(row["group"], (float("-inf"), row))[0]:
                latest_end[row["group"]] = (row["end"], row)

    # 2. Owners change only in generation order.
    out_of_order = 0
    for user, rows in by_user.items():
        observed = dedupe(r["group"] for r in rows)
        expected = dedupe(s[user] for s in sequence)
        if not is_subsequence(observed, expected):
            out_of_order += 1
            if out_of_order <= 20:
                violations.append({"criterion": 2, "user": user, "observed": observed, "expected": expected})

    # 3. Users whose owner never changed see no error; 4. moving users: 200 or 503 shard_moving
    # with Retry-After; no other 5xx, no 421. A request lost with a killed replica (no answer,
    # sent to it from before its kill until it was out of rotation) is counted apart instead.
    errors: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    steady_errors = moving_bad = 0
    refused_moving = 0
    for row in client:
        status, code = row["status"], row.get("code")
        if status == 200:
            continue
        errors[f"{status} {code}"] += 1
        if any(outage.lost(row) for outage in outages):
            lost[f"replica {row['replica']}: {code}"] += 1
            continue
        is_moving_refusal = status == 503 and code == "shard_moving" and bool(row.get("retry_after"))
        refused_moving += is_moving_refusal
        if row["user"] not in moving:
            steady_errors += 1
            if steady_errors <= 20:
                violations.append({"criterion": 3, "request": row})
        elif not is_moving_refusal:
            moving_bad += 1
            if moving_bad <= 20:
                violations.append({"criterion": 4, "request": row})

    # 5. Every write the client was told succeeded was recorded exactly once.
    recorded = Counter(str(r["rid"]) for r in accepted)
    not_once = 0
    for row in client:
        if row["status"] == 200 and recorded[row["rid"]] != 1:
            not_once += 1
            if not_once <= 20:
                violations.append({"criterion": 5, "request": row, "recorded": recorded[row["rid"]]})

    counts = {
        "1_overlaps": overlaps,
        "2_out_of_order_users": out_of_order,
        "3_errors_for_unmoved_users": steady_errors,
        "4_bad_answers_for_moving_users": moving_bad,
        "5_ok_not_recorded_once": not_once,
    }
    duration = (max(r["start"] for r in client) - min(r["start"] for r in client)) if client else 0.0

    def percentiles(rows: Iterable[dict[str, Any]]) -> list[float]:
        """p50, p99, max of the client's latency (seconds)."""
        values = sorted(r["end"] - r["start"] for r in rows)
        if not values:
            return []
        return [round(values[min(len(values) - 1, int(q * len(values)))], 3) for q in (0.5, 0.99, 1.0)]

    return {
        "writes_sent": len(client),
        "writes_ok": sum(1 for r in client if r["status"] == 200),
        "duration_seconds": round(duration, 1),
        "rate_per_second": round(len(client) / duration, 1) if duration else 0.0,
        "latency_p50_p99_max": percentiles(client),
        "latency_unmoved_users_p50_p99_max": percentiles(r for r in client if r["user"] not in moving),
        # Keys that do not move must not notice a hand-off: their writes sent during a fence
        # phase (as the harness saw the phases) against those sent outside one.
        "latency_unmoved_users_in_fence_phases_p50_p99_max": percentiles(
            r for r in client if r["user"] not in moving and in_fence_phase(states, r["start"])
        ),
        "latency_unmoved_users_outside_fence_phases_p50_p99_max": percentiles(
            r for r in client if r["user"] not in moving and not in_fence_phase(states, r["start"])
        ),
        "writes_accepted_by_backends": len(accepted),
        "moving_users": len(moving),
        "unmoved_users": users - len(moving),
        "status_counts": dict(Counter(str(r["status"]) for r in client)),
        "shard_moving_503": refused_moving,
        "status_421": sum(1 for r in client if r["status"] == 421),
        "errors_by_status_code": dict(errors),
        "killed_replica_connection_errors": {
            # Requests with no answer, left out of criteria 3 and 4 (only these).
            "count": sum(lost.values()),
            "by_replica_and_error": dict(lost),
            # All the requests of the outages' windows: the others were answered (before the
            # kill: the client saw it a moment after) and are judged as every other request.
            "in_flight_at_a_kill_or_sent_after": sum(1 for r in client if any(o.hit(r) for o in outages)),
            "outages": [
                {
                    "replica": o.replica,
                    "identity": o.identity,
                    "out_of_rotation_seconds_after_kill": round(o.out_of_rotation_at - o.killed_at, 3),
                }
                for o in outages
            ],
        },
        "owner_configs_in_force": len(sequence),
        "violation_counts": counts,
        "violations_total": sum(counts.values()),
        "violations": violations,
    }


def handoff_durations(states: Sequence[StateSeen]) -> list[dict[str, Any]]:
    """Each fence phase, as the harness saw the state ConfigMap: from the fencing state to the
    state after it (and its outcome)."""
    out = []
    for before, after in itertools.pairwise(states):
        if before.state.next is not None:
            out.append(
                {
                    "generation": before.state.generation,
                    "seconds": round(after.at - before.at, 2),
                    "outcome": after.state.outcome,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


INITIAL = {"group-1": 1, "group-2": 1, "group-3": 1, "group-4": 1}


def run(mode: str, rate: float = 500.0, users: int = 2000, directory: Path | None = None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"handoff-{mode}-")))
        directory.mkdir(parents=True, exist_ok=True)
        scene = Scene(mode, directory, rate, users)
        stack.callback(scene.close)
        scene.start(INITIAL)
        pause_until(time.monotonic() + 3.0)  # the load alone first
        (fenced_sequence if mode == "fenced" else immediate_sequence)(scene, dict(INITIAL))
        pause_until(time.monotonic() + 2.0)
        figures = scene.gateway_figures()
        client = scene.stop_load()
        accepted = [row for b in scene.backends.values() for row in read_jsonl(b.records)]
        report = check(client, accepted, scene.states, users, scene.outages)
        report.update(
            {
                "mode": mode,
                "handoff_config": handoff_section(mode),
                "handoffs": handoff_durations(scene.states),
                "leader_failover": scene.failover,
                "states": [
                    {
                        "generation": s.state.generation,
                        "phase": str(s.state.phase),
                        "outcome": s.state.outcome,
                    }
                    for s in scene.states
                ],
                "gateways": figures,
                "events": [{**e, "at": round(e["at"] - scene.events[0]["at"], 2)} for e in scene.events],
                "directory": str(directory),
            }
        )
        return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("violations", "events", "states")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("fenced", "immediate"), required=True)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="a directory for the logs and records (kept)")
    args = parser.parse_args(argv)
    report = run(args.mode, args.rate, args.users, args.keep)
    text = json.dumps(report, indent=2, default=str)
    if args.report is not None:
        args.report.write_text(text + "\n")
    print(json.dumps(summary(report), indent=2, default=str))
    return 0 if (report["violations_total"] == 0) == (args.mode == "fenced") else 1


if __name__ == "__main__":
    sys.exit(main())
