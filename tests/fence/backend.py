"""A backend process for the tests: an aiohttp app behind ``Fence.from_configmap(NAME)``, which
finds its group, namespace and credentials in the environment as a pod's would.

    python -m tests.fence.backend CONFIGMAP

Prints the port it listens on (127.0.0.1, chosen by the kernel) on the first line of stdout.
"""

from __future__ import annotations

import socket
import sys

from aiohttp import web

from gateway.fence import Fence


async def handle(request: web.Request) -> web.Response:
    return web.json_response({"handled": True})


def main(configmap: str) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    Fence.from_configmap(configmap).install(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main(sys.argv[1])
