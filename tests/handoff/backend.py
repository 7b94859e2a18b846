"""One fenced backend pod, as its own process (so that it can be SIGSTOPped).

    python -m tests.handoff.backend --configmap NAME --namespace NS --group G --pod P \
        --records PATH --port-file PATH [--confirm-interval S]

An aiohttp app behind ``Fence.from_configmap`` (credentials from ``KUBECONFIG``, as the gateway
finds them). Every write the fence let through is appended to ``--records`` as one JSON line
``{"user", "group", "pod", "rid", "start", "end"}`` (``time.monotonic()``: one clock for every
process on Linux), flushed per write. It answers ``{"group", "pod"}``. The port it listens on
(127.0.0.1, chosen by the system) is written to ``--port-file`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from gateway.fence import Fence

KEY_HEADER = "User-ID"
# What a write "does": it takes a while, as a write to a database does, so that two writes of
# one user can be running at once (what an overlap needs).
WORK_SECONDS = (0.2, 0.8)


def build_app(args: argparse.Namespace) -> web.Application:
    records = open(args.records, "a", buffering=1, encoding="utf-8")

    async def write(request: web.Request) -> web.Response:
        start = time.monotonic()
        raw = await request.read()
        rid = request.headers.get("X-Request-ID")
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        await asyncio.sleep(random.uniform(*WORK_SECONDS))
        end = time.monotonic()
        line = {
            "user": request.headers.get(KEY_HEADER),
            "group": args.group,
            "pod": args.pod,
            "rid": body.get("rid") or rid,
            "start": start,
            "end": end,
        }
        records.write(json.dumps(line, separators=(",", ":")) + "\n")
        records.flush()
        return web.json_response({"group": args.group, "pod": args.pod})

    async def read(request: web.Request) -> web.Response:
        return web.json_response({"group": args.group, "pod": args.pod})

    async def close_records(app: web.Application) -> None:
        records.close()

    app = web.Application()
    app.router.add_post("/{tail:.*}", write)
    app.router.add_get("/{tail:.*}", read)
    app.on_cleanup.append(close_records)
    fence = Fence.from_configmap(
        args.configmap,
        namespace=args.namespace,
        group=args.group,
        pod=args.pod,
        confirm_interval=args.confirm_interval,
    )
    fence.install(app)
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(args), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock, backlog=512)
    await site.start()
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configmap", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--confirm-interval", type=float, default=None)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
