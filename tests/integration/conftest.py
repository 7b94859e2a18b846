"""Harness for the integration tests: the real gateway process, test upstreams, the ring recipe.

The gateway is run exactly as an operator runs it (``python -m gateway run --config ...``) on
free ports; readiness is polled on the admin port with a deadline; it is stopped with SIGTERM
(and killed only if it does not exit). A gateway that died during a test is reported as an error
at teardown, with the tail of its log, so that a crash never hides behind a passing test.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.build import PURE_PYTHON_ENV
from tests.integration.upstream import (
    BlackholePort,
    DeadPort,
    HeaderLookup,
    UpstreamServer,
    start_upstreams,
    wait_until,
)
from tests.support import close_and_report, contract_ring, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_HEADER = "User-ID"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# Fast shutdown in tests: no drain delay (the lifecycle test sets its own).
BASE_ENV = {"SHARDGATE_DRAIN_DELAY": "0", "SHARDGATE_GRACE_TIMEOUT": "3"}


# ---------------------------------------------------------------------------------------------
# Shard config and the contract's ring recipe


@dataclass(frozen=True)
class GroupSpec:
    name: str
    endpoints: tuple[str, ...]
    weight: int = 1


def group_of(
    name: str, members: Sequence[UpstreamServer | DeadPort | BlackholePort | str], weight: int = 1
) -> GroupSpec:
    return GroupSpec(name, tuple(m if isinstance(m, str) else m.address for m in members), weight)


def config_document(
    groups: Sequence[GroupSpec],
    *,
    reads: str = "any",
    vnodes: int = 160,
    handoff: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``handoff``, ``health``: the config's sections of those names (left out when None)."""
    document: dict[str, Any] = {
        "version": 1,
        "routing": {
            "key_header": KEY_HEADER,
            "write_methods": ["POST", "PUT", "PATCH", "DELETE"],
            "operation_header": "Operation-Type",
            "reads": reads,
        },
        "ring": {"vnodes": vnodes},
        "groups": [{"name": g.name, "weight": g.weight, "endpoints": list(g.endpoints)} for g in groups],
    }
    if handoff is not None:
        document["handoff"] = dict(handoff)
    if health is not None:
        document["health"] = dict(health)
    return document


def render_config(
    groups: Sequence[GroupSpec],
    *,
    reads: str = "any",
    vnodes: int = 160,
    handoff: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
) -> str:
    document = config_document(groups, reads=reads, vnodes=vnodes, handoff=handoff, health=health)
    return yaml.safe_dump(document, sort_keys=False)


class Recipe:
    """owner(K) exactly as the contract spells it."""

    def __init__(self, groups: Sequence[GroupSpec] | Mapping[str, int], vnodes: int = 160) -> None:
        weights = {g.name: g.weight for g in groups} if not isinstance(groups, Mapping) else dict(groups)
        self._ring = contract_ring(weights, vnodes)
        self.groups = tuple(weights)

    def owner(self, key: str) -> str:
        return str(self._ring.get_node(key.strip(" \t")))  # OWS only, as the contract says

    def keys_owned_by(self, group: str, count: int, prefix: str = "user") -> list[str]:
        keys: list[str] = []
        i = 0
        while len(keys) < count:
            key = f"{prefix}-{i}"
            if self.owner(key) == group:
                keys.append(key)
            i += 1
            if i > 1_000_000:
                raise AssertionError(f"group {group} owns no keys")
        return keys


# ---------------------------------------------------------------------------------------------
# HTTP helpers


@dataclass
class HttpResult(HeaderLookup):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def http_request(
    target: int | http.client.HTTPConnection,
    method: str,
    path: str,
    headers: Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]] = (),
    body: bytes | None = None,
    timeout: float = 15.0,
) -> HttpResult:
    """One request with http.client; ``target`` is a port (new connection) or a kept-alive connection."""
    own = isinstance(target, int)
    if isinstance(target, int):
        conn = http.client.HTTPConnection("127.0.0.1", target, timeout=timeout)
    else:
        conn = target
    try:
        conn.putrequest(method, path)
        items = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return HttpResult(resp.status, list(resp.getheaders()), data)
    finally:
        if own:
            conn.close()


def assert_json_error(
    status: int, headers: Sequence[tuple[str, str]], body: bytes, want_status: int, want_codes: str | set[str]
) -> dict[str, Any]:
    """The contract's error shape: JSON {error, detail, request_id}, with the request id echoed."""
    codes = {want_codes} if isinstance(want_codes, str) else want_codes
    assert status == want_status, f"status {status} != {want_status}; body {body[:300]!r}"
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    assert doc.get("error") in codes, doc
    assert isinstance(doc.get("detail"), str) and doc["detail"], doc
    assert isinstance(doc.get("request_id"), str) and doc["request_id"], doc
    header_ids = [v for k, v in headers if k.lower() == "x-request-id"]
    if header_ids:
        assert header_ids[0] == doc["request_id"], (header_ids, doc)
    return doc


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


# ---------------------------------------------------------------------------------------------
# The gateway process


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config_path: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    expect_exit: bool = False  # set by a test that stops the gateway itself
    # /readyz said 200 while the proxy port refused: a readiness gap (an endpoints controller
    # would send traffic to a port that refuses it); the factory fails the start when it is set.
    ready_before_listening: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- memory -----------------------------------------------------------------------------------

    def _status_kb(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field_name} not in /proc/{self.pid}/status")

    def rss(self) -> int:
        """Current resident set size in bytes (VmRSS)."""
        return self._status_kb("VmRSS") * 1024

    def peak_rss(self) -> int:
        """Peak resident set size in bytes (VmHWM)."""
        return self._status_kb("VmHWM") * 1024

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    # -- admin ----------------------------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def admin_status(self, path: str, timeout: float = 2.0) -> int:
        """Status of an admin GET, or -1 when the admin server does not answer."""
        try:
            return self.admin_get(path, timeout=timeout)[0]
        except (OSError, http.client.HTTPException):
            return -1

    def admin_json(self, path: str) -> Any:
        status, _, body = self.admin_get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def debug_ring(self) -> dict[str, Any]:
        doc = self.admin_json("/debug/ring")
        assert isinstance(doc, dict)
        return doc

    def epoch(self) -> str:
        epoch = self.debug_ring()["epoch"]
        assert isinstance(epoch, str) and epoch, epoch
        return epoch

    def route(self, key: str) -> dict[str, Any]:
        from urllib.parse import quote

        doc = self.admin_json("/debug/route?key=" + quote(key, safe=""))
        assert isinstance(doc, dict)
        return doc

    def metrics(self) -> list[Sample]:
        status, _, body = self.admin_get("/metrics")
        assert status == 200, status
        out: list[Sample] = []
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of every sample called ``name`` whose labels include ``labels``."""
        return sum(
            s.value
            for s in self.metrics()
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    # -- config and process -----------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        """Replace the config file atomically (a reader never sees half a file)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def wait_for_epoch_change(self, old: str, timeout: float = 15.0) -> str:
        seen: list[str] = []

        def changed() -> bool:
            seen.append(self.epoch())
            return seen[-1] != old

        assert wait_until(changed, timeout, interval=0.1), f"epoch still {old} after {timeout}s"
        return seen[-1]

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"gateway exited with {self.proc.returncode}; log:\n{self.log_tail()}"

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


# For a gateway whose tests are about the answer to each failed attempt (the retry inside the
# owner group, then 502 / 504, its log line, span and metrics) rather than about ejection
# (tests/integration/test_proxy_health.py): no pod is ejected, so every request meets its
# failure as the test expects.
NO_EJECTION = {"passive": {"enabled": False}}


class GatewayFactory:
    """``factory(config_text_or_groups, env=..., reads=..., vnodes=...)`` starts a real gateway."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Gateway] = []
        self._count = 0

    def __call__(
        self,
        config: str | Sequence[GroupSpec],
        *,
        env: Mapping[str, str] | None = None,
        reads: str = "any",
        vnodes: int = 160,
        args: Sequence[str] = (),
        handoff: Mapping[str, Any] | None = None,
        health: Mapping[str, Any] | None = None,
    ) -> Gateway:
        """``args``: more ``shardgate run`` flags."""
        text = (
            config
            if isinstance(config, str)
            else render_config(config, reads=reads, vnodes=vnodes, handoff=handoff, health=health)
        )
        self._count += 1
        workdir = self.directory / f"gw{self._count}"
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "shards.yaml"
        config_path.write_text(text)
        last_error = ""
        for _attempt in range(3):
            gateway = self._spawn(workdir, config_path, env or {}, args)
            problem = self._wait_ready(gateway)
            if problem is None:
                self.started.append(gateway)
                # DESIGN "Admin server": /readyz is 200 when the gateway can serve. The data
                # plane binds before the admin port, so this never happens on a correct start.
                assert not gateway.ready_before_listening, (
                    f"/readyz said 200 while the proxy port {gateway.port} refused connections:\n"
                    + gateway.log_tail()
                )
                return gateway
            gateway.stop(5)
            last_error = problem
            if "in use" not in problem:  # only a lost port race is worth another try
                break
        raise AssertionError(f"gateway did not become ready: {last_error}")

    def _spawn(
        self, workdir: Path, config_path: Path, env: Mapping[str, str], args: Sequence[str] = ()
    ) -> Gateway:
        port, admin_port = free_port(), free_port()
        while admin_port == port:
            admin_port = free_port()
        # (SHARDGATE_PURE_PYTHON is kept: `make test-pure` runs these suites on the .py modules)
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_") or k == PURE_PYTHON_ENV
        }
        full_env.update(BASE_ENV)
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        log_path = workdir / f"gateway-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "run",
                    "--config",
                    str(config_path),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin_port}",
                    *args,
                ],
                cwd=REPO_ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return Gateway(proc, port, admin_port, config_path, log_path, dict(env))

    @staticmethod
    def _wait_ready(gateway: Gateway) -> str | None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not gateway.alive():
                return f"exited with {gateway.proc.returncode}:\n{gateway.log_tail()}"
            if gateway.admin_status("/readyz") == 200:
                break
            time.sleep(0.05)
        else:
            return f"/readyz not 200 within {READY_TIMEOUT}s:\n{gateway.log_tail()}"
        # /readyz must not answer 200 before the proxy port is bound: a gap is recorded on the
        # Gateway (and fails the start); waiting for the port too tells a gap from a dead port.
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
                return None
            except OSError:
                gateway.ready_before_listening = True
            if not gateway.alive():
                return f"exited with {gateway.proc.returncode}:\n{gateway.log_tail()}"
            time.sleep(0.02)
        return f"proxy port {gateway.port} not accepting within {READY_TIMEOUT}s:\n{gateway.log_tail()}"

    def close(self) -> list[str]:
        """Stop every gateway; returns a problem line for each that had died on its own."""
        problems = []
        for gateway in self.started:
            if not gateway.alive() and not gateway.expect_exit:
                problems.append(
                    f"gateway :{gateway.port} died during the tests (exit {gateway.proc.returncode}):\n"
                    + gateway.log_tail()
                )
            gateway.stop()
        self.started.clear()
        return problems


class UpstreamFactory:
    def __init__(self) -> None:
        self.servers: list[UpstreamServer] = []
        self.dead: list[DeadPort | BlackholePort] = []

    def __call__(
        self, group: str, count: int = 2, prefix: str | None = None, **kwargs: Any
    ) -> list[UpstreamServer]:
        servers = start_upstreams(group, count, prefix, **kwargs)
        self.servers.extend(servers)
        return servers

    def one(self, group: str, pod: str, **kwargs: Any) -> UpstreamServer:
        server = UpstreamServer(group, pod, **kwargs).start()
        self.servers.append(server)
        return server

    def dead_port(self) -> DeadPort:
        port = DeadPort()
        self.dead.append(port)
        return port

    def blackhole(self) -> BlackholePort:
        """An endpoint whose TCP handshake never completes (connects to it time out)."""
        port = BlackholePort()
        self.dead.append(port)
        return port

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for port in self.dead:
            port.close()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path)
    yield factory
    close_and_report(factory)


@pytest.fixture(scope="module")
def module_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path_factory.mktemp("gateways"))
    yield factory
    close_and_report(factory)


@pytest.fixture
def upstreams() -> Iterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_upstreams() -> Iterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    factory.close()


class LiveGroups:
    """Real upstream servers and the shard groups they form, with the contract's recipe."""

    def __init__(self, servers: list[UpstreamServer], groups: list[GroupSpec]) -> None:
        self.servers = servers
        self.groups = groups
        self.recipe = Recipe(groups)


def all_requests(
    servers: Sequence[UpstreamServer], predicate: Callable[[Any], bool] = lambda r: True
) -> list[Any]:
    return [r for s in servers for r in s.requests() if predicate(r)]


def assert_serves(gateway: Gateway, key: str = "still-alive") -> None:
    """The gateway is alive and proxies a plain write end to end."""
    gateway.assert_alive()
    result = http_request(gateway.port, "POST", "/still-serving", {KEY_HEADER: key}, b"{}")
    assert result.status == 200, (result.status, result.body[:300], gateway.log_tail())


def unicode_padded_keys(ring: Any) -> list[str]:
    """Keys padded with Unicode whitespace that is not OWS (NBSP, EM SPACE, IDEOGRAPHIC SPACE),
    each with another owner on ``ring`` than its bare-``str.strip()`` form: only a key handled
    as the contract says (strip spaces and tabs only) lands where the recipe says."""
    keys: list[str] = []
    for pad in ("\u00a0", "\u2003", "\u3000"):
        i = 0
        while True:
            key = f"{pad}ws-{i}" if i % 2 else f"ws-{i}{pad}"
            if str(ring.get_node(key)) != str(ring.get_node(key.strip())):
                keys.append(key)
                break
            i += 1
            assert i < 10_000, "no key whose bare strip() changes its owner"
    return keys
