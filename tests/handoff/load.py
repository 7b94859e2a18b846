"""The harness's load, as its own process (one event loop for the client, no GIL shared with the
API-server double):

    python -m tests.handoff.load --control PATH --ack PATH --out PATH [--rate 500] [--users 2000]

Sends ``--rate`` writes per second (a fixed-rate schedule, not a closed loop) for users
``user-0000`` .. over the gateway replicas listed in the control file, round robin over the
ones not marked down. The control file (JSON ``{"seq", "ports", "down"}``) is re-read every
50 ms; after reading a new ``seq`` the process writes ``{"seq", "inflight"}`` (requests in
flight per replica) to ``--ack`` whenever it changes, so the harness can wait until a replica
it took out of rotation has nothing in flight (what a Service does before a pod is stopped).
Every request is one JSON line of ``--out`` on SIGTERM: ``{"rid", "user", "replica", "status",
"code", "retry_after", "group", "start", "end"}`` (status -1: no HTTP answer, a replica refused
or broke the connection: ``code`` names the exception).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

KEY_HEADER = "User-ID"
MAX_IN_FLIGHT = 3000
REQUEST_TIMEOUT = 40.0


def user_name(i: int) -> str:
    return f"user-{i:04d}"


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ports: list[int] = []
        self.down: set[int] = set()
        self.seq = -1
        self.inflight: dict[int, int] = {}
        self.records: list[dict[str, Any]] = []
        self.stopping = asyncio.Event()
        self.sent = 0  # the schedule's position
        self.counter = 0  # requests actually sent
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(14)
        self._acked: tuple[int, dict[int, int]] | None = None

    def read_control(self) -> None:
        try:
            doc = json.loads(Path(self.args.control).read_text())
        except (OSError, ValueError):
            return
        if doc["seq"] != self.seq:
            self.seq = doc["seq"]
            self.ports = list(doc["ports"])
            self.down = set(doc["down"])
        self.ack()

    def ack(self) -> None:
        now = (self.seq, dict(self.inflight))
        if now == self._acked:
            return
        self._acked = now
        tmp = Path(self.args.ack + ".tmp")
        tmp.write_text(
            json.dumps({"seq": self.seq, "inflight": {str(k): v for k, v in self.inflight.items()}})
        )
        os.replace(tmp, self.args.ack)

    async def control_loop(self) -> None:
        while not self.stopping.is_set():
            self.read_control()
            await asyncio.sleep(0.05)

    async def one(self, session: aiohttp.ClientSession, replica: int, port: int, user: str, rid: str) -> None:
        start = time.monotonic()
        record: dict[str, Any] = {"rid": rid, "user": user, "replica": replica, "start": start}
        try:
            async with session.post(
                f"http://127.0.0.1:{port}/orders",
                data=json.dumps({"rid": rid, "item": 1}),
                headers={KEY_HEADER: user, "X-Request-ID": rid, "Content-Type": "application/json"},
            ) as resp:
                body = await resp.read()
                record["status"] = resp.status
                record["retry_after"] = resp.headers.get("Retry-After")
                record["group"] = resp.headers.get("X-Shard-Group")
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                doc = doc if isinstance(doc, dict) else {}
                record["code"] = doc.get("error") if resp.status != 200 else None
                if resp.status == 200:
                    record["group"] = doc.get("group") or record["group"]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            record.update(status=-1, code=type(exc).__name__, retry_after=None, group=None)
        finally:
            record["end"] = time.monotonic()
            self.records.append(record)
            self.inflight[replica] -= 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.read_control()
        control = asyncio.create_task(self.control_loop())
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            began = time.monotonic()
            turn = 0
            while not self.stopping.is_set():
                due = int((time.monotonic() - began) * self.args.rate)
                while self.sent < due and len(self.tasks) < MAX_IN_FLIGHT:
                    up = [i for i in range(len(self.ports)) if i not in self.down]
                    if not up:
                        break
                    replica = up[turn % len(up)]
                    turn += 1
                    user = user_name(self.rng.randrange(self.args.users))
                    rid = f"h-{self.counter:08d}"
                    self.counter += 1
                    self.inflight[replica] = self.inflight.get(replica, 0) + 1
                    task = asyncio.create_task(self.one(session, replica, self.ports[replica], user, rid))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                    self.sent += 1
                if len(self.tasks) >= MAX_IN_FLIGHT or not self.ports:
                    self.sent = max(self.sent, due)  # a schedule, not a backlog
                await asyncio.sleep(0.005)
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=REQUEST_TIMEOUT + 5)
        control.cancel()
        tmp = Path(self.args.out + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for record in self.records:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
        os.replace(tmp, self.args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--control", required=True)
    parser.add_argument("--ack", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--users", type=int, default=2000)
    asyncio.run(Load(parser.parse_args()).run())


if __name__ == "__main__":
    main()
