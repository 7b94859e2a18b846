"""The systems under test and the backends they share: config rendering and startup.

Topology (all on 127.0.0.1): one nginx master with one worker serves 6 ports, `return 200`;
they form 3 shard groups x 2 pods. Each proxy runs one worker with keep-alive upstream pools:
nginx (`hash $http_user_id consistent` over the 6 servers), HAProxy (`balance hdr(User-ID)` +
`hash-type consistent` over the 6 servers) and shardgate (ring over the 3 groups).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Managed, Supervisor, http_status, wait_until
from bench.tools import find_tool

HOST = "127.0.0.1"
GROUPS = 3
PODS_PER_GROUP = 2
KEY_HEADER = "User-ID"
PROBE_PATH = "/orders"
PROBE_HEADERS = {KEY_HEADER: "user-probe", "Content-Type": "application/json"}
PROBE_BODY = b'{"probe":true}'

PROXY_SYSTEMS = ("shardgate", "nginx", "haproxy")
DIRECT = "direct"

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """Something wrk can be pointed at."""

    name: str
    port: int
    process: Managed | None  # None: not a process of its own (the direct backend row)
    reference: bool = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PROBE_PATH}"


# ---------------------------------------------------------------------------------- configs


def _nginx_user_directive() -> str:
    # As root, nginx would switch its worker to `nobody`, which cannot enter our private temp
    # dir; keep the worker as the current user. As non-root the directive is ignored with a
    # warning, so only emit it for root.
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name};"


def _nginx_main(prefix: Path) -> list[str]:
    """Everything up to and including the opening of the `http` block."""
    temp = prefix / "tmp"
    return [
        _nginx_user_directive(),
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        "    keepalive_timeout 75s;",
        "    keepalive_requests 1000000;",
        f"    client_body_temp_path {temp / 'body'};",
        f"    proxy_temp_path {temp / 'proxy'};",
        f"    fastcgi_temp_path {temp / 'fastcgi'};",
        f"    uwsgi_temp_path {temp / 'uwsgi'};",
        f"    scgi_temp_path {temp / 'scgi'};",
    ]


def _lines(lines: list[str]) -> str:
    return "\n".join(line for line in lines if line) + "\n"


def render_backends_nginx(prefix: Path, ports: Sequence[int]) -> str:
    servers = [
        f'    server {{ listen {HOST}:{port}; location / {{ return 200 "ok\\n"; }} }}' for port in ports
    ]
    return _lines([*_nginx_main(prefix), *servers, "}"])


def render_proxy_nginx(prefix: Path, listen: int, backend_ports: Sequence[int]) -> str:
    return _lines(
        [
            *_nginx_main(prefix),
            "    upstream shards {",
            "        hash $http_user_id consistent;",
            *(f"        server {HOST}:{port};" for port in backend_ports),
            "        keepalive 64;",
            "        keepalive_requests 1000000;",
            "        keepalive_timeout 60s;",
            "    }",
            "    server {",
            f"        listen {HOST}:{listen};",
            "        location / {",
            "            proxy_pass http://shards;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "        }",
            "    }",
            "}",
        ]
    )


def render_haproxy(listen: int, backend_ports: Sequence[int]) -> str:
    return _lines(
        [
            "global",
            "    nbthread 1",
            # haproxy wants ~2 fds per connection and refuses to start above RLIMIT_NOFILE.
            "    maxconn 4096",
            "defaults",
            "    mode http",
            "    option http-keep-alive",
            "    http-reuse always",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    timeout http-keep-alive 30s",
            "frontend bench",
            f"    bind {HOST}:{listen}",
            "    default_backend shards",
            "backend shards",
            f"    balance hdr({KEY_HEADER})",
            "    hash-type consistent",
            *(f"    server pod{index} {HOST}:{port}" for index, port in enumerate(backend_ports, 1)),
        ]
    )


def render_shard_config(groups: Sequence[Sequence[int]]) -> str:
    lines = [
        "version: 1",
        "routing:",
        f"  key_header: {KEY_HEADER}",
        "ring:",
        "  vnodes: 160",
        "groups:",
    ]
    for index, ports in enumerate(groups, 1):
        endpoints = ", ".join(f'"{HOST}:{port}"' for port in ports)
        lines += [f"  - name: group-{index}", f"    endpoints: [{endpoints}]"]
    return "\n".join(lines) + "\n"


def group_ports(backend_ports: Sequence[int]) -> list[list[int]]:
    return [list(backend_ports[i : i + PODS_PER_GROUP]) for i in range(0, len(backend_ports), PODS_PER_GROUP)]


# ---------------------------------------------------------------------------------- startup


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


def start_backends(sup: Supervisor, workdir: Path, ports: Sequence[int], timeout: float = 10.0) -> Managed:
    prefix = workdir / "backends"
    managed = _start_nginx(sup, "backends", prefix, render_backends_nginx(prefix, ports))
    wait_until(
        lambda: all(_probe_ok(port) for port in ports),
        what=f"backends on ports {', '.join(map(str, ports))}",
        timeout=timeout,
        watch=[managed],
    )
    return managed


def start_nginx_proxy(
    sup: Supervisor, workdir: Path, listen: int, backend_ports: Sequence[int], timeout: float = 10.0
) -> Target:
    prefix = workdir / "nginx-proxy"
    managed = _start_nginx(sup, "nginx", prefix, render_proxy_nginx(prefix, listen, backend_ports))
    wait_until(lambda: _probe_ok(listen), what="nginx proxy", timeout=timeout, watch=[managed])
    return Target("nginx", listen, managed)


def start_haproxy(
    sup: Supervisor, workdir: Path, listen: int, backend_ports: Sequence[int], timeout: float = 10.0
) -> Target:
    conf = workdir / "haproxy.cfg"
    conf.write_text(render_haproxy(listen, backend_ports))
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


def gateway_python() -> str:
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else os.environ.get("PYTHON", "python3")


def start_shardgate(
    sup: Supervisor,
    workdir: Path,
    listen: int,
    admin: int,
    backend_ports: Sequence[int],
    timeout: float = 30.0,
) -> Target:
    conf = workdir / "shards.yaml"
    conf.write_text(render_shard_config(group_ports(backend_ports)))
    env = dict(os.environ)
    env.update(
        {
            "SHARDGATE_WORKERS": "1",
            # Shut down promptly at the end of the benchmark; there is no traffic to drain.
            "SHARDGATE_DRAIN_DELAY": "0",
            "SHARDGATE_GRACE_TIMEOUT": "2",
            # INFO: lifecycle lines (start, signals, stop) land in the log for diagnosis. The
            # gateway logs nothing per request at INFO, like the other proxies' `access_log off`.
            "SHARDGATE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    argv = [
        gateway_python(),
        "-m",
        "gateway",
        "run",
        "--config",
        str(conf),
        "--listen",
        f"{HOST}:{listen}",
        "--admin-listen",
        f"{HOST}:{admin}",
    ]
    managed = sup.start("shardgate", argv, env=env, cwd=REPO_ROOT)
    wait_until(
        lambda: http_status(HOST, admin, "GET", "/readyz") == 200,
        what="shardgate /readyz",
        timeout=timeout,
        watch=[managed],
    )
    wait_until(lambda: _probe_ok(listen), what="shardgate proxying", timeout=timeout, watch=[managed])
    return Target("shardgate", listen, managed)
