"""The API-server double (``tests/k8s/apiserver.py``) as a process of its own.

    python -m tests.k8s.serve --fixtures FILE [--port N] [--host H] [--kubeconfig PATH]
                              [--namespace NS]

FILE is JSON with the objects to serve (both lists optional)::

    {"configmaps": [{"namespace": "shards", "name": "cfg", "data": {"shards.yaml": "..."},
                     "labels": {...}}],
     "endpointslices": [{"namespace": "shards", "name": "svc-a", "service": "svc",
                         "endpoints": [...], "ports": [...]}]}

(``endpoints``/``ports`` in API shape, as ``FakeApiServer.put_endpointslice`` takes them.) Once
the double listens, the kubeconfig is written (atomically, so a reader never sees half of it)
and one line ``listening on URL`` is printed; it then serves until SIGTERM or SIGINT. The
benchmark (``bench/``) runs the gateway's Kubernetes source against it this way, so that the
double's own work and memory stay out of the processes it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tests.k8s.apiserver import FakeApiServer


def load_fixtures(api: FakeApiServer, fixtures: dict[str, Any]) -> int:
    """Put every object of ``fixtures`` into ``api``; the number of objects."""
    count = 0
    for item in fixtures.get("configmaps", []):
        api.put_configmap(item["namespace"], item["name"], item["data"], item.get("labels"))
        count += 1
    for item in fixtures.get("endpointslices", []):
        api.put_endpointslice(
            item["namespace"],
            item["name"],
            item["service"],
            item.get("endpoints", []),
            item.get("ports", []),
            labels=item.get("labels"),
        )
        count += 1
    return count


def write_kubeconfig(api: FakeApiServer, path: Path, namespace: str) -> None:
    """The double's kubeconfig at ``path``, renamed into place once complete."""
    partial = path.with_name(path.name + ".partial")
    api.kubeconfig(partial, namespace=namespace)
    os.replace(partial, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, required=True, help="JSON file with the objects to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for the double here")
    parser.add_argument("--namespace", default="default", help="the kubeconfig context's namespace")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fixtures = json.loads(args.fixtures.read_text())
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    api = FakeApiServer(host=args.host, port=args.port)
    api.start()
    try:
        objects = load_fixtures(api, fixtures)
        if args.kubeconfig is not None:
            write_kubeconfig(api, args.kubeconfig, args.namespace)
        print(f"listening on {api.url} ({objects} objects)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
