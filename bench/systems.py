"""The systems under test and the backends they share: startup, readiness, serving processes.

Topology (all on 127.0.0.1): one nginx master with one worker serves 6 ports; they form 3 shard
groups x 2 pods. Each port answers `return 200` on every path except those of the transfer
measurements (`POST /upload` reads the whole request body before it answers, `GET
/files/10MiB.bin` is a static file) and of the header check (`/headers`, see bench/headers.py).
Each proxy runs one worker with keep-alive upstream pools: nginx (`hash $http_user_id
consistent` over the 6 servers), HAProxy (`balance hdr(User-ID)` + `hash-type consistent` over
the 6 servers) and shardgate (ring over the 3 groups; its config from the Kubernetes source, see
bench/k8s.py), in two builds: `shardgate` (compiled where installed) and `shardgate-pure`
(`SHARDGATE_PURE_PYTHON=1`). Config files: bench/configs.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.build import BuildInfo, loaded_extensions, probe_build
from bench.configs import (
    CONFIGMAP,
    DEFAULT_MAX_CLIENTS,
    DOWNLOAD_BYTES,
    DOWNLOAD_PATH,
    HOST,
    KEY_HEADER,
    NAMESPACE,
    PROBE_PATH,
    render_backends_nginx,
    render_haproxy,
    render_proxy_nginx,
)
from bench.procs import Managed, Supervisor, http_status, wait_until
from bench.tools import find_tool

PROBE_HEADERS = {KEY_HEADER: "user-probe", "Content-Type": "application/json"}
PROBE_BODY = b'{"probe":true}'

SHARDGATE_SYSTEMS = ("shardgate", "shardgate-pure")
PROXY_SYSTEMS = (*SHARDGATE_SYSTEMS, "nginx", "haproxy")
DIRECT = "direct"
PURE_PYTHON_ENV = "SHARDGATE_PURE_PYTHON"

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """Something wrk can be pointed at."""

    name: str
    port: int
    process: Managed | None  # None: not a process of its own (the direct backend row)
    reference: bool = False
    build: BuildInfo | None = None  # shardgate systems: the gateway build it runs
    config_source: dict[str, Any] | None = None  # shardgate systems: what /debug/ring said at start

    @property
    def url(self) -> str:
        return self.url_for(PROBE_PATH)

    def url_for(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


@dataclass(frozen=True)
class KubernetesSource:
    """Where the gateway finds its config: the API-server double's kubeconfig."""

    kubeconfig: Path


# ---------------------------------------------------------------------------------- nginx, HAProxy


def _nginx_argv(prefix: Path, conf: Path) -> list[str]:
    # -e: the startup error log, before the config's error_log applies (default is /var/log).
    return [find_tool("nginx"), "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]


def _check_nginx_config(prefix: Path, conf: Path) -> None:
    result = subprocess.run(
        [*_nginx_argv(prefix, conf), "-t", "-q"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}:\n{result.stderr.strip()}")


def _start_nginx(sup: Supervisor, name: str, prefix: Path, conf_text: str) -> Managed:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    _check_nginx_config(prefix, conf)
    return sup.start(name, _nginx_argv(prefix, conf))


def _probe_ok(port: int) -> bool:
    status = http_status(HOST, port, "POST", PROBE_PATH, headers=PROBE_HEADERS, body=PROBE_BODY)
    return status is not None and 200 <= status < 300


def write_download_file(prefix: Path) -> Path:
    path = prefix / "www" / DOWNLOAD_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(DOWNLOAD_BYTES))  # random: nothing on the way can compress it
    return path


def start_backends(
    sup: Supervisor, workdir: Path, ports: Sequence[int], capture_socket: Path, timeout: float = 10.0
) -> Managed:
    prefix = workdir / "backends"
    write_download_file(prefix)
    managed = _start_nginx(sup, "backends", prefix, render_backends_nginx(prefix, ports, capture_socket))
    wait_until(
        lambda: all(_probe_ok(port) for port in ports),
        what=f"backends on ports {', '.join(map(str, ports))}",
        timeout=timeout,
        watch=[managed],
    )
    return managed


def start_nginx_proxy(
    sup: Supervisor,
    workdir: Path,
    listen: int,
    backend_ports: Sequence[int],
    epoch: str,
    timeout: float = 10.0,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> Target:
    prefix = workdir / "nginx-proxy"
    conf = render_proxy_nginx(prefix, listen, backend_ports, epoch, max_clients)
    managed = _start_nginx(sup, "nginx", prefix, conf)
    wait_until(lambda: _probe_ok(listen), what="nginx proxy", timeout=timeout, watch=[managed])
    return Target("nginx", listen, managed)


def start_haproxy(
    sup: Supervisor,
    workdir: Path,
    listen: int,
    backend_ports: Sequence[int],
    epoch: str,
    timeout: float = 10.0,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> Target:
    conf = workdir / "haproxy.cfg"
    conf.write_text(render_haproxy(listen, backend_ports, epoch, max_clients))
    haproxy = find_tool("haproxy")
    check = subprocess.run(
        [haproxy, "-c", "-q", "-f", str(conf)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected {conf}:\n{(check.stdout + check.stderr).strip()}")
    # -db: stay in the foreground (no daemon), so the process we started is the one serving.
    managed = sup.start("haproxy", [haproxy, "-db", "-f", str(conf)])
    wait_until(lambda: _probe_ok(listen), what="haproxy", timeout=timeout, watch=[managed])
    return Target("haproxy", listen, managed)


# ---------------------------------------------------------------------------------- shardgate


def gateway_python() -> str:
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else os.environ.get("PYTHON", "python3")


def shardgate_env(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of shardgate system ``name``: ours less any SHARDGATE_*/KUBERNETES_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDGATE_", "KUBERNETES_"))}
    if name == "shardgate-pure":
        env[PURE_PYTHON_ENV] = "1"  # the pure-Python modules even where compiled ones are installed
    env.update(extra or {})
    return env


def start_shardgate(
    sup: Supervisor,
    name: str,
    listen: int,
    admin: int,
    source: KubernetesSource,
    timeout: float = 30.0,
) -> Target:
    python = gateway_python()
    env = shardgate_env(
        name,
        {
            "KUBECONFIG": str(source.kubeconfig),
            "SHARDGATE_WORKERS": "1",
            # Shut down promptly at the end of the benchmark; there is no traffic to drain.
            "SHARDGATE_DRAIN_DELAY": "0",
            "SHARDGATE_GRACE_TIMEOUT": "2",
            # INFO: lifecycle lines (start, signals, stop) land in the log for diagnosis. The
            # gateway logs nothing per request at INFO, like the other proxies' `access_log off`.
            "SHARDGATE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        },
    )
    build = probe_build(python, env, REPO_ROOT)
    argv = [
        python,
        "-m",
        "gateway",
        "run",
        "--configmap",
        CONFIGMAP,
        "--namespace",
        NAMESPACE,
        "--listen",
        f"{HOST}:{listen}",
        "--admin-listen",
        f"{HOST}:{admin}",
    ]
    managed = sup.start(name, argv, env=env, cwd=REPO_ROOT)
    wait_until(
        lambda: http_status(HOST, admin, "GET", "/readyz") == 200,
        what=f"{name} /readyz",
        timeout=timeout,
        watch=[managed],
    )
    wait_until(lambda: _probe_ok(listen), what=f"{name} proxying", timeout=timeout, watch=[managed])
    build.loaded_extensions = loaded_extensions(managed.pid, build.package_dir)
    return Target(name, listen, managed, build=build, config_source=config_source(admin))


def config_source(admin: int) -> dict[str, Any] | None:
    """The gateway's config source as its /debug/ring shows it: source, watch states, epoch, pods."""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://{HOST}:{admin}/debug/ring", timeout=5) as response:
            ring = json.loads(response.read())
        config = ring.get("config") or {}
        return {
            "source": config.get("source"),
            "watches": {watch["resource"]: watch["state"] for watch in config.get("watches") or []},
            "epoch": ring.get("epoch"),
            "pods": sum(len(group.get("pods") or []) for group in ring.get("groups") or []),
        }
    return None


def serving_pids(target: Target) -> list[int]:
    """The processes that hold the target's client connections: nginx's workers, else the pid.

    shardgate runs with SHARDGATE_WORKERS=1, which serves in the process we started; HAProxy
    runs in the foreground (`-db`) without a master process.
    """
    if target.process is None:
        return []
    pid = target.process.pid
    if target.name != "nginx":
        return [pid]
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after its ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)
