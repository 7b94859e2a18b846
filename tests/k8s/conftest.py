"""Harness for the Kubernetes tests: the API-server double, pod servers, the gateway process.

The gateway runs exactly as in a cluster (``python -m gateway run --configmap NAME --namespace
NS``) with ``KUBECONFIG`` pointing at the double; its pods are ``PodFarm`` servers on distinct
loopback addresses sharing one port, as pod IPs do. Everything waits by polling with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.build import PURE_PYTHON_ENV
from tests.k8s.apiserver import FakeApiServer, endpoint, port
from tests.k8s.pods import KEY_HEADER, PodFarm
from tests.support import close_and_report, contract_ring, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
NS = "shards"
CONFIGMAP = "shardgate"
ADMIN_UP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# How long a change may take to show: a deadline for a loaded 2-core machine, not a speed
# (typical: < 0.3 s); waiting costs time only when the change never comes.
DEADLINE = 10.0


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or the deadline passes; the last result."""
    return wait_until(predicate, timeout, interval)


# ---------------------------------------------------------------------------------------------
# Shard config and the contract's ring recipe


@dataclass(frozen=True)
class Group:
    name: str
    service: str
    weight: int = 1
    port: int | str | None = "http"


def shard_config(groups: Sequence[Group], *, vnodes: int = 160, reads: str = "any") -> str:
    document: dict[str, Any] = {
        "version": 1,
        "routing": {"key_header": KEY_HEADER, "reads": reads},
        "ring": {"vnodes": vnodes},
        "groups": [
            {"name": g.name, "weight": g.weight, "service": g.service}
            | ({"port": g.port} if g.port is not None else {})
            for g in groups
        ],
    }
    return yaml.safe_dump(document, sort_keys=False)


class Recipe:
    """owner(K), exactly as the contract spells it."""

    def __init__(self, groups: Sequence[Group] | Mapping[str, int], vnodes: int = 160) -> None:
        weights = dict(groups) if isinstance(groups, Mapping) else {g.name: g.weight for g in groups}
        self._ring = contract_ring(weights, vnodes)

    def owner(self, key: str) -> str:
        return str(self._ring.get_node(key.strip(" \t")))  # OWS only, as the contract says

    def keys_of(self, group: str, count: int, prefix: str = "user") -> list[str]:
        keys: list[str] = []
        i = 0
        while len(keys) < count:
            key = f"{prefix}-{i}"
            if self.owner(key) == group:
                keys.append(key)
            i += 1
            assert i < 1_000_000, f"group {group} owns no keys"
        return keys


def put_config(api: FakeApiServer, groups: Sequence[Group] | str, **kwargs: Any) -> None:
    text = groups if isinstance(groups, str) else shard_config(groups, **kwargs)
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": text})


def put_pods(
    api: FakeApiServer,
    farm: PodFarm,
    service: str,
    hosts: Mapping[str, dict[str, bool]] | Sequence[str],
    slice_name: str | None = None,
) -> None:
    """One EndpointSlice of ``service`` listing ``hosts`` (host -> endpoint() conditions)."""
    conditions = {h: {} for h in hosts} if not isinstance(hosts, Mapping) else dict(hosts)
    api.put_endpointslice(
        NS,
        slice_name or f"{service}-abcde",
        service,
        [endpoint(h, pod=f"{service}-{h.rsplit('.', 1)[1]}", **c) for h, c in conditions.items()],
        [port(farm.port, "http")],
    )


# ---------------------------------------------------------------------------------------------
# Talking to the gateway


@dataclass(frozen=True)
class Result:
    status: int  # -1: no HTTP answer at all (connection refused, reset, timeout)
    group: str | None  # X-Shard-Group of the response
    pod: str | None  # the pod that served it (from the pod's echo)
    error: str | None  # the gateway's error code, or the exception for status -1
    retry_after: str | None = None


class Client:
    """Requests over one kept-alive connection (re-opened after any failure)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, key: str | None, path: str = "/orders") -> Result:
        headers = {KEY_HEADER: key} if key is not None else {}
        body = b'{"item": 1}' if method in ("POST", "PUT", "PATCH") else None
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        conn = self._conn
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Result(-1, None, None, f"{type(exc).__name__}: {exc}")
        if resp.will_close:
            self.close()
        doc: Any = None
        with contextlib.suppress(ValueError):
            doc = json.loads(data)
        doc = doc if isinstance(doc, dict) else {}
        return Result(
            resp.status,
            resp.getheader("X-Shard-Group"),
            doc.get("pod") if resp.status == 200 else None,
            doc.get("error") if resp.status != 200 else None,
            resp.getheader("Retry-After"),
        )

    def write(self, key: str) -> Result:
        return self.request("POST", key)

    def read(self, key: str) -> Result:
        return self.request("GET", key)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass(frozen=True)
class Sent:
    key: str
    method: str
    started: float
    result: Result


class SteadyLoad:
    """A background client sending writes and reads for ``keys`` in a loop, one at a time.

    Every request is kept (``sent``); ``barrier()`` waits until two more requests have
    completed, so everything the gateway had already picked a pod for has been served.
    """

    def __init__(self, port: int, keys: Sequence[str]) -> None:
        self._client = Client(port)
        self._keys = list(keys)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        assert self.barrier(), "the steady client did not get going"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = self._keys[i % len(self._keys)]
            method = "POST" if i % 2 == 0 else "GET"
            started = time.monotonic()
            result = self._client.request(method, key)
            with self._cond:
                self.sent.append(Sent(key, method, started, result))
                self._cond.notify_all()
            i += 1
        self._client.close()

    def barrier(self, requests: int = 2, timeout: float = DEADLINE) -> bool:
        with self._cond:
            target = len(self.sent) + requests
            return self._cond.wait_for(lambda: len(self.sent) >= target, timeout)

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "steady client stuck"
        with self._lock:
            return list(self.sent)

    def failures(self) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.result.status != 200]


# ---------------------------------------------------------------------------------------------
# The gateway process


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    # -- admin ----------------------------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def admin_status(self, path: str) -> int:
        try:
            return self.admin_get(path, timeout=3.0)[0]
        except (OSError, http.client.HTTPException):
            return -1

    def admin_json(self, path: str) -> Any:
        status, body = self.admin_get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def ring(self) -> dict[str, Any]:
        doc = self.admin_json("/debug/ring")
        assert isinstance(doc, dict)
        return doc

    def epoch(self) -> str | None:
        epoch = self.ring()["epoch"]
        return epoch if isinstance(epoch, str) else None

    def pod_states(self) -> dict[str, str]:
        """address -> state, over every group of the topology in force."""
        return {p["address"]: p["state"] for g in self.ring()["groups"] for p in g["pods"]}

    def watches(self) -> dict[str, dict[str, Any]]:
        return {w["resource"]: w for w in self.ring()["config"]["watches"]}

    def route(self, key: str) -> str:
        doc = self.admin_json("/debug/route?key=" + quote(key, safe=""))
        return str(doc["group"])

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        status, body = self.admin_get("/metrics")
        assert status == 200, status
        return sum(
            s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    # -- process --------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


class GatewayFactory:
    """``factory()`` starts a gateway against the double; returns once its admin port answers."""

    def __init__(self, api: FakeApiServer, directory: Path) -> None:
        self.api = api
        self.directory = directory
        self.kubeconfig = api.kubeconfig(directory / "kubeconfig", namespace=NS)
        self.started: list[GatewayProcess] = []

    def __call__(
        self,
        *,
        watch_timeout: float = 30.0,
        ready: bool = True,
        env: Mapping[str, str] | None = None,
        namespace: str | None = NS,
        kubeconfig: bool = True,
    ) -> GatewayProcess:
        """``namespace`` None: no ``--namespace`` flag; ``kubeconfig`` False: no ``KUBECONFIG``
        (for a test that gives in-cluster credentials in ``env``)."""
        for _attempt in range(3):
            gateway = self._spawn(watch_timeout, env or {}, namespace, kubeconfig)
            problem = self._wait_up(gateway, ready)
            if problem is None:
                self.started.append(gateway)
                return gateway
            gateway.stop()
            if "in use" not in problem:  # only a lost port race is worth another try
                break
        raise AssertionError(f"gateway did not start: {problem}")

    def _spawn(
        self, watch_timeout: float, extra: Mapping[str, str], namespace: str | None, kubeconfig: bool
    ) -> GatewayProcess:
        listen, admin = free_port(), free_port()
        while admin == listen:
            admin = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SHARDGATE_", "KUBERNETES_")) or k == PURE_PYTHON_ENV
        }
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "SHARDGATE_DRAIN_DELAY": "0",
                "SHARDGATE_GRACE_TIMEOUT": "3",
                "SHARDGATE_WATCH_BACKOFF_MAX": "1",
                "SHARDGATE_WATCH_TIMEOUT": str(watch_timeout),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if not kubeconfig:
            del env["KUBECONFIG"]
        env.update(extra)
        log_path = self.directory / f"gateway-{listen}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "run",
                    "--configmap",
                    CONFIGMAP,
                    *(["--namespace", namespace] if namespace is not None else []),
                    "--listen",
                    f"127.0.0.1:{listen}",
                    "--admin-listen",
                    f"127.0.0.1:{admin}",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return GatewayProcess(proc, listen, admin, log_path, dict(extra))

    @staticmethod
    def _wait_up(gateway: GatewayProcess, ready: bool) -> str | None:
        want = (200,) if ready else (200, 503)
        deadline = time.monotonic() + ADMIN_UP_TIMEOUT
        while time.monotonic() < deadline:
            if not gateway.alive():
                return f"exited with {gateway.proc.returncode}:\n{gateway.log_tail()}"
            if gateway.admin_status("/readyz") in want:
                return None
            time.sleep(0.05)
        return f"/readyz not in {want} within {ADMIN_UP_TIMEOUT}s:\n{gateway.log_tail()}"

    def close(self) -> list[str]:
        problems = [
            f"gateway :{g.port} died during the test (exit {g.proc.returncode}):\n{g.log_tail()}"
            for g in self.started
            if not g.alive()
        ]
        for gateway in self.started:
            gateway.stop()
        self.started.clear()
        return problems


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def farm() -> Iterator[PodFarm]:
    with PodFarm(12) as pods:
        yield pods


@pytest.fixture
def start_gateway(api: FakeApiServer, tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(api, tmp_path)
    yield factory
    close_and_report(factory)
