"""The systems under test and the backends they share: config rendering and startup.

Topology (all on 127.0.0.1): one nginx master with one worker serves 6 ports; they form 3 shard
groups x 2 pods. Each port answers `return 200` on every path except two used by the transfer
measurements: `POST /upload` reads the whole request body (up to 2 MiB, in memory) before it
answers, and `GET /files/10MiB.bin` is a static file (sendfile). Each proxy runs one worker with
keep-alive upstream pools: nginx (`hash $http_user_id consistent` over the 6 servers), HAProxy
(`balance hdr(User-ID)` + `hash-type consistent` over the 6 servers) and shardgate (ring over the
3 groups).
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

UPLOAD_PATH = "/upload"
UPLOAD_BYTES = 1024 * 1024
DOWNLOAD_PATH = "/files/10MiB.bin"
DOWNLOAD_BYTES = 10 * 1024 * 1024
# Client connections every proxy must accept at once (the idle-connections measurement adds
# this many to its usual few dozen); configs are sized from it.
DEFAULT_MAX_CLIENTS = 4096

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
        return self.url_for(PROBE_PATH)

    def url_for(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


# ---------------------------------------------------------------------------------- configs


def _nginx_user_directive() -> str:
    # As root, nginx would switch its worker to `nobody`, which cannot enter our private temp
    # dir; keep the worker as the current user. As non-root the directive is ignored with a
    # warning, so only emit it for root.
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name};"


def _nginx_main(prefix: Path, worker_connections: int = 4096) -> list[str]:
    """Everything up to and including the opening of the `http` block."""
    temp = prefix / "tmp"
    return [
        _nginx_user_directive(),
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        f"events {{ worker_connections {worker_connections}; }}",
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
    # nginx's `return` answers before it has read a request body (it discards the body
    # afterwards), so an upload would be acknowledged early. `proxy_pass` with request
    # buffering on (the default) reads the whole body first: into memory, as it fits
    # client_body_buffer_size. Only the head goes on (`proxy_pass_request_body off`), to a
    # `return 200` on a unix socket: the backend really receives every byte, cheaply.
    sink = prefix / "sink.sock"

    def server(port: int) -> list[str]:
        return [
            "    server {",
            f"        listen {HOST}:{port};",
            '        location / { return 200 "ok\\n"; }',
            f"        location = {UPLOAD_PATH} {{",
            "            client_max_body_size 2m;",
            "            client_body_buffer_size 2m;",
            "            proxy_pass http://sink;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_pass_request_body off;",
            '            proxy_set_header Content-Length "";',
            "        }",
            f"        location /files/ {{ root {prefix / 'www'}; sendfile on; tcp_nopush on; }}",
            "    }",
        ]

    return _lines(
        [
            *_nginx_main(prefix),
            f"    upstream sink {{ server unix:{sink}; keepalive 64; }}",
            f'    server {{ listen unix:{sink}; location / {{ return 200 "ok\\n"; }} }}',
            *(line for port in ports for line in server(port)),
            "}",
        ]
    )


def render_proxy_nginx(
    prefix: Path, listen: int, backend_ports: Sequence[int], max_clients: int = DEFAULT_MAX_CLIENTS
) -> str:
    upstream = [
        "            proxy_pass http://shards;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
    ]
    return _lines(
        [
            # Room for max_clients idle clients plus their upstream connections.
            *_nginx_main(prefix, worker_connections=max(4096, max_clients + 1024)),
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
            *upstream,
            "        }",
            # Transfers stream through, as they do through HAProxy and shardgate: with request
            # buffering nginx would first store each 1 MiB upload (in a temp file, as it exceeds
            # client_body_buffer_size) and only then start sending it upstream.
            f"        location = {UPLOAD_PATH} {{",
            "            client_max_body_size 20m;",
            "            proxy_request_buffering off;",
            *upstream,
            "        }",
            # Downloads: response buffering off, so nginx never spools a 10 MiB response to a
            # temp file when the client reads slower than the backend writes.
            "        location /files/ {",
            "            proxy_buffering off;",
            *upstream,
            "        }",
            "    }",
            "}",
        ]
    )


def render_haproxy(listen: int, backend_ports: Sequence[int], max_clients: int = DEFAULT_MAX_CLIENTS) -> str:
    maxconn = max(4096, max_clients + 1024)
    return _lines(
        [
            "global",
            "    nbthread 1",
            # haproxy wants ~2 fds per connection (client + server side) and, with strict limits
            # (its default), refuses to start if RLIMIT_NOFILE cannot be raised that far. Idle
            # clients need one fd each, and the harness raises the limit we inherit as far as
            # it can: a warning is enough.
            f"    maxconn {maxconn}",
            "    no strict-limits",
            "defaults",
            "    mode http",
            # The frontend's own limit (it defaults to something far lower in some versions).
            f"    maxconn {maxconn}",
            "    option http-keep-alive",
            "    http-reuse always",
            "    timeout connect 5s",
            # Idle keep-alive clients are kept 60 s, like shardgate's default client idle
            # timeout (nginx: keepalive_timeout 75s).
            "    timeout client 60s",
            "    timeout server 30s",
            "    timeout http-keep-alive 60s",
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


def write_download_file(prefix: Path) -> Path:
    path = prefix / "www" / DOWNLOAD_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(DOWNLOAD_BYTES))  # random: nothing on the way can compress it
    return path


def start_backends(sup: Supervisor, workdir: Path, ports: Sequence[int], timeout: float = 10.0) -> Managed:
    prefix = workdir / "backends"
    write_download_file(prefix)
    managed = _start_nginx(sup, "backends", prefix, render_backends_nginx(prefix, ports))
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
    timeout: float = 10.0,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> Target:
    prefix = workdir / "nginx-proxy"
    conf = render_proxy_nginx(prefix, listen, backend_ports, max_clients)
    managed = _start_nginx(sup, "nginx", prefix, conf)
    wait_until(lambda: _probe_ok(listen), what="nginx proxy", timeout=timeout, watch=[managed])
    return Target("nginx", listen, managed)


def start_haproxy(
    sup: Supervisor,
    workdir: Path,
    listen: int,
    backend_ports: Sequence[int],
    timeout: float = 10.0,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> Target:
    conf = workdir / "haproxy.cfg"
    conf.write_text(render_haproxy(listen, backend_ports, max_clients))
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
