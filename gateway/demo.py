"""`shardgate demo`: local demo shard groups (3 groups x 2 pods) with the gateway in front.

Each demo pod is a small real aiohttp service. Its group's "database shard" is the SQLite file
``<data dir>/<group>.sqlite3``, shared by the group's two pods (WAL mode). ``POST /orders``
stores the JSON body for the request's user in the pod's own group file; ``GET /orders`` reads
every group's file, as a read replica would, so any pod can serve it. Each pod runs the backend
fence (``gateway.fence``) on the demo's shard state file, so it refuses, before the handler runs,
a write its group does not own in the shard state (421); and a write that arrives with an
``X-Shard-Group`` naming another group is refused with 421 too (a check on the gateway's word).

Everything runs in one process and one uvloop event loop: the pods, then the gateway, until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from gateway.fence import Fence

GROUPS: tuple[str, ...] = ("group-1", "group-2", "group-3")
# Runs from the start but owns nothing until the config names it: the banner shows how to add
# it, which the gateway hands off (fence phase, barrier, commit) while it serves.
ADDED_GROUP = "group-4"
ADDED_CONFIG = "shards-with-group-4.yaml"
PODS_PER_GROUP = 2
DEMO_HOST = "127.0.0.1"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
KEY_HEADER = "User-ID"
VNODES = 160
FENCE_POLL = 0.2  # the pods' fences read the demo's shard state file this often (seconds)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS orders ("
    "order_id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, body TEXT NOT NULL,"
    " pod TEXT NOT NULL, created REAL NOT NULL)"
)

GROUP_KEY: web.AppKey[str] = web.AppKey("group", str)
POD_KEY: web.AppKey[str] = web.AppKey("pod", str)
DATA_DIR_KEY: web.AppKey[Path] = web.AppKey("data_dir", Path)


# ---------------------------------------------------------------------------------------------
# SQLite "database shards" (blocking; called through asyncio.to_thread)


def shard_path(data_dir: Path, group: str) -> Path:
    return data_dir / f"{group}.sqlite3"


def _connect(path: Path) -> sqlite3.Connection:
    # Both pods of a group write the same file: wait for the lock rather than fail at once.
    return sqlite3.connect(path, timeout=10.0, isolation_level=None)


def init_shard(path: Path) -> None:
    """Create the group's file and table (idempotent; safe when both pods do it)."""
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(_SCHEMA)
    finally:
        conn.close()


def insert_order(path: Path, user_id: str, body: str, pod: str) -> int:
    conn = _connect(path)
    try:
        cursor = conn.execute(
            "INSERT INTO orders (user_id, body, pod, created) VALUES (?, ?, ?, ?)",
            (user_id, body, pod, time.time()),
        )
        order_id = cursor.lastrowid
    finally:
        conn.close()
    assert order_id is not None
    return order_id


def orders_for(data_dir: Path, user_id: str) -> list[dict[str, Any]]:
    """The user's orders from every group's file in ``data_dir``, oldest first."""
    orders: list[dict[str, Any]] = []
    for path in sorted(data_dir.glob("*.sqlite3")):
        conn = _connect(path)
        try:
            rows = conn.execute(
                "SELECT order_id, body, pod, created FROM orders WHERE user_id = ? ORDER BY order_id",
                (user_id,),
            ).fetchall()
        except sqlite3.OperationalError:
            continue  # a file being created right now, without its table yet
        finally:
            conn.close()
        group = path.name.removesuffix(".sqlite3")
        for order_id, body, pod, created in rows:
            orders.append(
                {
                    "group": group,
                    "order_id": order_id,
                    "pod": pod,
                    "created": created,
                    "body": json.loads(body),
                }
            )
    orders.sort(key=lambda order: (order["created"], order["group"], order["order_id"]))
    return orders


# ---------------------------------------------------------------------------------------------
# The pod app


def _error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "detail": detail, **extra}, status=status)


def _user_id(request: web.Request) -> str | None:
    value = request.headers.get(KEY_HEADER, "").strip()
    return value or None


async def _post_order(request: web.Request) -> web.Response:
    app = request.app
    group, pod = app[GROUP_KEY], app[POD_KEY]
    routed_to = request.headers.get("X-Shard-Group")
    if routed_to is not None and routed_to != group:
        return _error(
            421,
            "misdirected",
            f"this pod belongs to {group!r}, the request was routed for {routed_to!r}",
            group=group,
            pod=pod,
        )
    user_id = _user_id(request)
    if user_id is None:
        return _error(400, "missing_user_id", f"the {KEY_HEADER} header is required")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return _error(400, "invalid_json", "the request body must be JSON")
    order_id = await asyncio.to_thread(
        insert_order, shard_path(app[DATA_DIR_KEY], group), user_id, json.dumps(body), pod
    )
    return web.json_response({"group": group, "pod": pod, "order_id": order_id}, status=201)


async def _get_orders(request: web.Request) -> web.Response:
    app = request.app
    user_id = _user_id(request)
    if user_id is None:
        return _error(400, "missing_user_id", f"the {KEY_HEADER} header is required")
    orders = await asyncio.to_thread(orders_for, app[DATA_DIR_KEY], user_id)
    return web.json_response(
        {"user": user_id, "served_by": {"group": app[GROUP_KEY], "pod": app[POD_KEY]}, "orders": orders}
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "group": request.app[GROUP_KEY], "pod": request.app[POD_KEY]})


def make_pod_app(group: str, pod: str, data_dir: Path, fence: Fence | None = None) -> web.Application:
    """One demo pod of ``group``; its shard is ``data_dir/<group>.sqlite3`` (created here).
    ``fence``: the backend fence it runs (``gateway.fence``), checking every write against the
    shard state before the handler runs."""
    init_shard(shard_path(data_dir, group))
    app = web.Application()
    if fence is not None:
        fence.install(app)
    app[GROUP_KEY] = group
    app[POD_KEY] = pod
    app[DATA_DIR_KEY] = data_dir
    app.router.add_post("/orders", _post_order)
    app.router.add_get("/orders", _get_orders)
    app.router.add_get("/healthz", _healthz)
    return app


async def start_app(app: web.Application, host: str = DEMO_HOST) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on ``host`` at a port the OS picks (bound before serving: no race)."""
    sock = bound_socket(host)
    return await serve_on(app, sock), sock.getsockname()[:2]


def bound_socket(host: str = DEMO_HOST) -> socket.socket:
    """A socket bound to a port the OS picks: its address is known before anything serves."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


async def serve_on(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


# ---------------------------------------------------------------------------------------------
# The demo


def _pod_names(group: str) -> list[str]:
    return [f"{group}-{chr(ord('a') + index)}" for index in range(PODS_PER_GROUP)]


def _config_yaml(endpoints: dict[str, list[str]]) -> str:
    lines = [
        "# written by `shardgate demo`",
        "version: 1",
        "routing:",
        f"  key_header: {KEY_HEADER}",
        "  reads: any",
        "ring:",
        f"  vnodes: {VNODES}",
        "groups:",
    ]
    for group, addresses in endpoints.items():
        lines.append(f"  - name: {group}")
        lines.append("    weight: 1")
        lines.append(f"    endpoints: {json.dumps(addresses)}")
    return "\n".join(lines) + "\n"


def _url(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _owners(cfg_path: Path, keys: list[str]) -> dict[str, str]:
    from gateway.config import load_shard_config
    from gateway.ring import ShardRing

    ring = ShardRing(load_shard_config(str(cfg_path)))
    return {key: ring.owner(key) for key in keys}


def _first_moving_user(added_cfg: Path) -> str:
    """A user whose owner the added group becomes (the banner's example of a moved key)."""
    users = [f"user-{index}" for index in range(1000)]
    owners = _owners(added_cfg, users)
    return next(user for user in users if owners[user] == ADDED_GROUP)  # ~1 user in 4


def banner(
    *,
    pods: dict[str, list[tuple[str, tuple[str, int]]]],
    gateway_url: str,
    admin_url: str,
    cfg_path: Path,
    data_dir: Path,
) -> str:
    def write(user: str | None, item: str) -> str:
        key = f" -H {shlex.quote(f'{KEY_HEADER}: {user}')}" if user else ""
        data = shlex.quote(json.dumps({"item": item}))
        return f"curl -s -X POST {gateway_url}/orders{key} -H 'Content-Type: application/json' -d {data}"

    cfg = shlex.quote(str(cfg_path))
    users = [("alice", "book"), ("bob", "lamp"), ("carol", "mug"), ("grace", "desk")]
    owners = _owners(cfg_path, [user for user, _ in users])
    added_cfg = cfg_path.with_name(ADDED_CONFIG)
    mover = _first_moving_user(added_cfg)
    out = ["shardgate demo: 3 shard groups x 2 pods, with the gateway in front", ""]
    for group, members in pods.items():
        listed = ", ".join(f"{pod} {_url(address)}" for pod, address in members)
        label = f"{group} (not in the config yet)" if group == ADDED_GROUP else group
        out.append(f"  {label}: {listed}   (shard: {shard_path(data_dir, group)})")
    out += [
        "",
        f"  gateway: {gateway_url}",
        f"  admin:   {admin_url}",
        f"  config:  {cfg_path}",
        f"  data:    {data_dir}",
        "",
        "Try (writes go to the key's owner group; reads may go to any pod):",
        "",
        *(write(user, item) for user, item in users),
        f"curl -s {gateway_url}/orders -H {shlex.quote(f'{KEY_HEADER}: alice')}",
        "",
        "A write without the key header is refused (400 missing_shard_key):",
        "",
        write(None, "pen"),
        "",
        "Who owns a key, and what the gateway sees:",
        "",
        f"curl -s '{admin_url}/debug/route?key=alice'",
        f"curl -s {admin_url}/debug/ring",
        f"curl -s {admin_url}/metrics",
        f"shardgate route --config {cfg} {' '.join(user for user, _ in users)}"
        f"    # {', '.join(f'{user} -> {owners[user]}' for user, _ in users)}",
        "",
        f"Reshard while it serves: add {ADDED_GROUP} (its pods run already). See what moves, apply it,",
        "and watch the hand-off in /debug/ring (config.handoff: fence phase, barrier, commit;",
        "config.generation goes up); then a write for a moved user lands in the new group:",
        "",
        f"shardgate plan {cfg} {shlex.quote(str(added_cfg))}",
        f"cp {shlex.quote(str(added_cfg))} {cfg}",
        f"curl -s {admin_url}/debug/ring",
        write(mover, "chair") + f"    # {mover}: {_owners(cfg_path, [mover])[mover]} -> {ADDED_GROUP}",
        "",
        "Press Ctrl+C to stop.",
    ]
    return "\n".join(out)


async def _run(listen: str | None, admin_listen: str | None) -> int:
    from gateway.app import Gateway
    from gateway.config import ConfigError
    from gateway.settings import load_settings

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    runners: list[web.AppRunner] = []
    sockets: dict[tuple[str, str], socket.socket] = {}
    with tempfile.TemporaryDirectory(prefix="shardgate-demo-") as tmp:
        data_dir = Path(tmp)
        try:
            pods: dict[str, list[tuple[str, tuple[str, int]]]] = {}
            cfg_path = data_dir / "shards.yaml"
            # The pods' addresses go into the config, and their fences read the shard state
            # the gateway writes from it as it starts: bound first, served once it has.
            for group in (*GROUPS, ADDED_GROUP):
                pods[group] = []
                for pod in _pod_names(group):
                    sock = sockets[(group, pod)] = bound_socket()
                    pods[group].append((pod, sock.getsockname()[:2]))
            endpoints = {
                group: [f"{host}:{port}" for _, (host, port) in members] for group, members in pods.items()
            }
            cfg_path.write_text(_config_yaml({group: endpoints[group] for group in GROUPS}))
            cfg_path.with_name(ADDED_CONFIG).write_text(_config_yaml(endpoints))

            listen = listen or DEFAULT_LISTEN
            admin_listen = admin_listen or DEFAULT_ADMIN_LISTEN
            try:
                settings = load_settings(config_path=str(cfg_path), listen=listen, admin_listen=admin_listen)
            except ConfigError as exc:
                for problem in exc.problems:
                    print(f"shardgate demo: {problem}", file=sys.stderr, flush=True)
                return 1

            gateway = Gateway(settings)
            try:
                await gateway.start()
            except ConfigError as exc:  # the config written above was refused: a bug, say so
                for problem in exc.problems:
                    print(f"shardgate demo: {cfg_path}: {problem}", file=sys.stderr, flush=True)
                return 1
            except OSError as exc:
                reason = exc.strerror or str(exc)
                print(
                    f"shardgate demo: cannot listen on {listen} (admin {admin_listen}): {reason};"
                    " pick free addresses with --listen HOST:PORT / --admin-listen HOST:PORT",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(Exception):  # release whatever part of it did bind
                    await asyncio.wait_for(gateway.stop(), timeout=5.0)
                return 1
            try:
                fences: list[Fence] = []
                for (group, pod), sock in sockets.items():
                    fence = Fence.from_file(str(cfg_path), group, poll_interval=FENCE_POLL, pod=pod)
                    fences.append(fence)
                    runners.append(await serve_on(make_pod_app(group, pod, data_dir, fence), sock))
                # The pods' fences accept writes once they have read the state.
                await _fences_confirmed(fences)
                bound, admin_bound = gateway.listen_address, gateway.admin_address
                assert bound is not None and admin_bound is not None  # set by a successful start()
                text = banner(
                    pods=pods,
                    gateway_url=_url(bound),
                    admin_url=_url(admin_bound),
                    cfg_path=cfg_path,
                    data_dir=data_dir,
                )
                print(text, flush=True)
                await stop.wait()
                print("shardgate demo: stopping", flush=True)
            finally:
                await gateway.stop()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            for sock in sockets.values():
                sock.close()  # (those never served, if the gateway could not start)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    return 0


async def _fences_confirmed(fences: list[Fence], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(fence.confirmed() for fence in fences) and time.monotonic() < deadline:
        await asyncio.sleep(FENCE_POLL / 2)  # polling the fences' own state: no event to wait on


def main(listen: str | None = None, admin_listen: str | None = None) -> int:
    """Run the demo until SIGINT/SIGTERM; 0 on a clean stop, 1 if it could not start."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(listen, admin_listen))
