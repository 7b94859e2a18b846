"""Config files of the systems under test and of the backends they share.

nginx and HAProxy are configured as production reverse proxies doing the header work the gateway
does (gateway/proxy/request_head.py `upstream_head`, gateway/proxy/response_head.py `finish_head`),
no more and no less; bench/README.md has the table. Toward the upstream:

- X-Forwarded-For, the peer appended: nginx `$proxy_add_x_forwarded_for`; HAProxy
  `option forwardfor` (a line added after the client's, never `if-none`).
- X-Forwarded-Proto / X-Forwarded-Host, the client's kept, else `http` / the Host: nginx maps;
  HAProxy `set-header ... unless` the client sent one.
- X-Request-ID, the client's if the gateway's rule accepts it, else a new one: nginx a regex map
  falling back to `$request_id`; HAProxy `unique-id` `unless` the same regex matches.
- Via chained (`1.1 nginx` / `1.1 haproxy`); X-Shard-Epoch, the gateway's epoch; X-Shard-Group:
  HAProxy `http-send-name-header` (set once the server is picked, like the gateway's group),
  nginx `$proxy_host` (it builds the head before it picks the pod); Host kept; the client's
  X-Shard-* dropped (HAProxy `del-header -m beg`; nginx replaces the two it sets).

Toward the client: X-Request-ID and X-Shard-Group (nginx `add_header ... always`, the group
from a map of `$upstream_addr`; HAProxy `http-after-response`/`http-response set-header`), the
upstream's copies removed. Hop-by-hop fields are dropped by all three by default; upstream
connections are kept alive by all.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
GROUPS = 3
PODS_PER_GROUP = 2
KEY_HEADER = "User-ID"
PROBE_PATH = "/orders"
HEADERS_PATH = "/headers"  # backends relay this path to the header-capture socket (bench/headers.py)
UPLOAD_PATH = "/upload"
UPLOAD_BYTES = 1024 * 1024
DOWNLOAD_PATH = "/files/10MiB.bin"
DOWNLOAD_BYTES = 10 * 1024 * 1024
# Client connections every proxy must accept at once (the idle-connections measurement adds
# this many to its usual few dozen); configs are sized from it.
DEFAULT_MAX_CLIENTS = 4096

# The gateway's request-id rule (gateway/proxy/http.py _VALID_REQUEST_ID): a client's id is kept
# only if it matches; the other proxies get the same rule.
REQUEST_ID_REGEX = "^[A-Za-z0-9._:/+=@-]{1,128}$"

# Kubernetes objects of the gateway's config source (served by the API-server double).
NAMESPACE = "shards"
CONFIGMAP = "shardgate-shards"
PORT_NAME = "http"

# What the bench/README.md setup table and the report state about the transfer rows.
TRANSFER_SETTINGS = {
    "nginx": "upload: proxy_request_buffering off, client_max_body_size 20m; download: proxy_buffering off;"
    " default buffer sizes (proxy_buffer_size 4k: one page)",
    "haproxy": "defaults (tune.bufsize 16384), no compression",
    "shardgate": "defaults (max body 64 MiB), bodies streamed under flow control",
}


def group_name(index: int) -> str:
    return f"group-{index}"


def service_name(index: int) -> str:
    return f"data-writer-group-{index}"


def group_ports(backend_ports: Sequence[int]) -> list[list[int]]:
    return [list(backend_ports[i : i + PODS_PER_GROUP]) for i in range(0, len(backend_ports), PODS_PER_GROUP)]


def pod_groups(backend_ports: Sequence[int]) -> dict[int, str]:
    """backend port -> the name of its shard group."""
    return {
        port: group_name(index) for index, ports in enumerate(group_ports(backend_ports), 1) for port in ports
    }


def render_shard_config(groups: int = GROUPS) -> str:
    """The shard config of the ConfigMap: each group is a Service, resolved through EndpointSlices."""
    lines = [
        "version: 1",
        "routing:",
        f"  key_header: {KEY_HEADER}",
        "ring:",
        "  vnodes: 160",
        "groups:",
    ]
    for index in range(1, groups + 1):
        lines += [
            f"  - name: {group_name(index)}",
            f"    service: {service_name(index)}",
            f"    port: {PORT_NAME}",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- nginx


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
        # Regular expressions (the request-id map) compiled to machine code, as in production.
        "pcre_jit on;",
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


def render_backends_nginx(prefix: Path, ports: Sequence[int], capture_socket: Path | None = None) -> str:
    # nginx's `return` answers before it has read a request body (it discards the body
    # afterwards), so an upload would be acknowledged early. `proxy_pass` with request
    # buffering on (the default) reads the whole body first: into memory, as it fits
    # client_body_buffer_size. Only the head goes on (`proxy_pass_request_body off`), to a
    # `return 200` on a unix socket: the backend really receives every byte, cheaply.
    sink = prefix / "sink.sock"
    capture = capture_socket or prefix / "capture.sock"

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
            # The header check: the request head as this backend received it goes on to the
            # harness's capture socket, which answers with it (only Host is set: nginx relays
            # the other fields line by line, less its own hop-by-hop ones).
            f"        location = {HEADERS_PATH} {{",
            "            proxy_pass http://capture;",
            "            proxy_set_header Host $http_host;",
            "        }",
            f"        location /files/ {{ root {prefix / 'www'}; sendfile on; tcp_nopush on; }}",
            "    }",
        ]

    return _lines(
        [
            *_nginx_main(prefix),
            f"    upstream sink {{ server unix:{sink}; keepalive 64; }}",
            f"    upstream capture {{ server unix:{capture}; }}",
            f'    server {{ listen unix:{sink}; location / {{ return 200 "ok\\n"; }} }}',
            *(line for port in ports for line in server(port)),
            "}",
        ]
    )


def _nginx_maps(backend_ports: Sequence[int]) -> list[str]:
    groups = pod_groups(backend_ports)
    return [
        # The client's X-Request-ID when the gateway would keep it (same rule), else a new one.
        "    map $http_x_request_id $kept_request_id {",
        f'        "~{REQUEST_ID_REGEX}" $http_x_request_id;',
        "        default $request_id;",
        "    }",
        "    map $http_x_forwarded_proto $forwarded_proto {",
        '        "" $scheme;',
        "        default $http_x_forwarded_proto;",
        "    }",
        "    map $http_x_forwarded_host $forwarded_host {",
        '        "" $http_host;',
        "        default $http_x_forwarded_host;",
        "    }",
        "    map $http_via $via_chain {",
        '        "" "1.1 nginx";',
        '        default "$http_via, 1.1 nginx";',
        "    }",
        # The group of the pod that answered, for the response (known once a pod was picked).
        "    map $upstream_addr $shard_group {",
        *(f"        {HOST}:{port} {group};" for port, group in groups.items()),
        '        default "";',
        "    }",
    ]


def _nginx_header_directives(epoch: str) -> list[str]:
    """Server-level header work (no location sets its own, so every location inherits these)."""
    return [
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $http_host;",
        "        proxy_set_header X-Request-ID $kept_request_id;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Forwarded-Proto $forwarded_proto;",
        "        proxy_set_header X-Forwarded-Host $forwarded_host;",
        "        proxy_set_header Via $via_chain;",
        f"        proxy_set_header X-Shard-Epoch {epoch};",
        # nginx builds the request head before it picks the pod: the upstream's name stands in.
        "        proxy_set_header X-Shard-Group $proxy_host;",
        "        proxy_hide_header X-Request-ID;",
        "        proxy_hide_header X-Shard-Group;",
        "        add_header X-Request-ID $kept_request_id always;",
        "        add_header X-Shard-Group $shard_group always;",
    ]


def render_proxy_nginx(
    prefix: Path,
    listen: int,
    backend_ports: Sequence[int],
    epoch: str,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> str:
    return _lines(
        [
            # Room for max_clients idle clients plus their upstream connections.
            *_nginx_main(prefix, worker_connections=max(4096, max_clients + 1024)),
            *_nginx_maps(backend_ports),
            "    upstream shards {",
            "        hash $http_user_id consistent;",
            *(f"        server {HOST}:{port};" for port in backend_ports),
            "        keepalive 64;",
            "        keepalive_requests 1000000;",
            "        keepalive_timeout 60s;",
            "    }",
            "    server {",
            f"        listen {HOST}:{listen};",
            *_nginx_header_directives(epoch),
            "        location / { proxy_pass http://shards; }",
            # Transfers stream through, as they do through HAProxy and shardgate: with request
            # buffering nginx would first store each 1 MiB upload (in a temp file, as it exceeds
            # client_body_buffer_size) and only then start sending it upstream.
            f"        location = {UPLOAD_PATH} {{",
            "            client_max_body_size 20m;",
            "            proxy_request_buffering off;",
            "            proxy_pass http://shards;",
            "        }",
            # Downloads: response buffering off, so nginx never spools a 10 MiB response to a
            # temp file when the client reads slower than the backend writes.
            "        location /files/ {",
            "            proxy_buffering off;",
            "            proxy_pass http://shards;",
            "        }",
            "    }",
            "}",
        ]
    )


# ---------------------------------------------------------------------------------- HAProxy


def haproxy_server_name(port_index: int) -> str:
    """Server names carry their group (sent as X-Shard-Group): group-1-a, group-1-b, group-2-a, ..."""
    group, pod = divmod(port_index, PODS_PER_GROUP)
    return f"{group_name(group + 1)}-{'abcdefghijklmnop'[pod]}"


def render_haproxy(
    listen: int, backend_ports: Sequence[int], epoch: str, max_clients: int = DEFAULT_MAX_CLIENTS
) -> str:
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
            # Appends the peer: a new X-Forwarded-For line after the client's (never if-none).
            "    option forwardfor",
            "    http-reuse always",
            "    timeout connect 5s",
            # Idle keep-alive clients are kept 60 s, like shardgate's default client idle
            # timeout (nginx: keepalive_timeout 75s).
            "    timeout client 60s",
            "    timeout server 30s",
            "    timeout http-keep-alive 60s",
            "frontend bench",
            f"    bind {HOST}:{listen}",
            # A new request id: process id and request counter (like the gateway's prefix and
            # counter), made only when the client's is missing or not valid.
            "    unique-id-format %{+X}o%pid-%rt",
            "    http-request del-header x-shard- -m beg",
            "    http-request set-header X-Request-ID %[unique-id]"
            f" unless {{ req.fhdr(x-request-id) -m reg '{REQUEST_ID_REGEX}' }}",
            "    http-request set-var(txn.request_id) req.fhdr(x-request-id)",
            "    http-request set-header X-Forwarded-Proto http"
            " unless { req.hdr(x-forwarded-proto) -m found }",
            "    http-request set-header X-Forwarded-Host %[req.fhdr(host)]"
            " if { req.hdr(host) -m found } !{ req.hdr(x-forwarded-host) -m found }",
            '    http-request add-header Via "1.1 haproxy"',
            f"    http-request set-header X-Shard-Epoch {epoch}",
            # Every response, HAProxy's own errors too (as the gateway's carry it).
            "    http-after-response set-header X-Request-ID %[var(txn.request_id)]",
            "    default_backend shards",
            "backend shards",
            f"    balance hdr({KEY_HEADER})",
            "    hash-type consistent",
            # Set once the server is picked (and again on a redispatch), like the gateway's group.
            "    http-send-name-header X-Shard-Group",
            "    http-response set-header X-Shard-Group %[srv_name]",
            *(
                f"    server {haproxy_server_name(index)} {HOST}:{port}"
                for index, port in enumerate(backend_ports)
            ),
        ]
    )
