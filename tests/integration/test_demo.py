"""`shardgate demo`: the demo pods alone, then the whole demo driven by its own printed curl lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.demo import ADDED_GROUP, GROUPS, make_pod_app, shard_path, start_app
from tests.support import contract_ring, free_port, require_tool

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE = 30.0
STOP_DEADLINE = 30.0
CURL_TIMEOUT = 10.0


def contract_owner(key: str) -> str:
    """owner(K), computed with the contract's recipe and nothing of the gateway's."""
    return contract_ring({group: 1 for group in GROUPS}, 160).get_node(key.strip(" \t"))


# ---------------------------------------------------------------------------------------------
# The demo pod app alone, on aiohttp's real server


def test_pod_app_stores_per_group_and_reads_every_shard(tmp_path: Path) -> None:
    async def scenario() -> None:
        started = []
        try:
            for group, pod in (("group-1", "group-1-a"), ("group-1", "group-1-b"), ("group-2", "group-2-a")):
                runner, (host, port) = await start_app(make_pod_app(group, pod, tmp_path))
                started.append((runner, f"http://{host}:{port}"))
            url_1a, url_1b, url_2a = (url for _, url in started)

            async with aiohttp.ClientSession() as client:
                async with client.get(f"{url_1a}/healthz") as resp:
                    assert resp.status == 200

                # Both pods of group-1 write the same shard file; group-2 writes its own.
                ids = []
                for url, item in ((url_1a, "book"), (url_1b, "lamp")):
                    async with client.post(
                        f"{url}/orders", json={"item": item}, headers={"User-ID": "alice"}
                    ) as resp:
                        assert resp.status == 201
                        body = await resp.json()
                        assert body["group"] == "group-1"
                        assert body["pod"] == ("group-1-a" if url == url_1a else "group-1-b")
                        ids.append(body["order_id"])
                assert ids[1] > ids[0]  # one sequence per shard, shared by the group's pods
                async with client.post(
                    f"{url_2a}/orders",
                    json={"item": "pen"},
                    headers={"User-ID": "alice", "X-Shard-Group": "group-2"},
                ) as resp:
                    assert resp.status == 201
                    assert (await resp.json())["group"] == "group-2"

                # The backend-side ownership check: a write routed for another group is refused.
                async with client.post(
                    f"{url_1a}/orders",
                    json={"item": "cup"},
                    headers={"User-ID": "alice", "X-Shard-Group": "group-3"},
                ) as resp:
                    assert resp.status == 421
                    assert (await resp.json())["error"] == "misdirected"

                async with client.post(f"{url_1a}/orders", json={"item": "cup"}) as resp:
                    assert resp.status == 400
                    assert "error" in await resp.json()
                async with client.post(
                    f"{url_1a}/orders", data=b"not json{", headers={"User-ID": "alice"}
                ) as resp:
                    assert resp.status == 400
                    assert "error" in await resp.json()

                # Any pod serves a read over every group's shard.
                async with client.get(f"{url_2a}/orders", headers={"User-ID": "alice"}) as resp:
                    assert resp.status == 200
                    listing = await resp.json()
                assert listing["user"] == "alice"
                assert listing["served_by"] == {"group": "group-2", "pod": "group-2-a"}
                assert sorted(o["body"]["item"] for o in listing["orders"]) == ["book", "lamp", "pen"]
                assert {o["group"] for o in listing["orders"]} == {"group-1", "group-2"}
                async with client.get(f"{url_1b}/orders", headers={"User-ID": "bob"}) as resp:
                    assert (await resp.json())["orders"] == []
        finally:
            for runner, _ in started:
                await runner.cleanup()

    asyncio.run(scenario())

    # Persisted in the SQLite files, each write in its own group's shard only.
    def rows(group: str) -> list[tuple[str, str, str]]:
        with contextlib.closing(sqlite3.connect(shard_path(tmp_path, group))) as conn:
            return conn.execute("SELECT user_id, body, pod FROM orders ORDER BY order_id").fetchall()

    assert [(u, json.loads(b)["item"], p) for u, b, p in rows("group-1")] == [
        ("alice", "book", "group-1-a"),
        ("alice", "lamp", "group-1-b"),
    ]
    assert [(u, json.loads(b)["item"], p) for u, b, p in rows("group-2")] == [("alice", "pen", "group-2-a")]
    with contextlib.closing(sqlite3.connect(shard_path(tmp_path, "group-1"))) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------------------------
# The whole demo, as a user runs it


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def run_curl(line: str) -> CurlResult:
    argv = shlex.split(line, comments=True)  # as a shell reads a pasted line
    assert argv[0] == "curl"
    # -i: the status line and headers come first in the output.
    done = subprocess.run(
        [require_tool("curl"), "-i", "--max-time", str(CURL_TIMEOUT), *argv[1:]],
        capture_output=True,
        timeout=CURL_TIMEOUT + 5,
        check=False,
    )
    assert done.returncode == 0, f"{line!r} failed: {done.stderr.decode(errors='replace')}"
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for header in header_lines:
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(status, headers, body)


class Demo:
    """`python -m gateway demo` in a subprocess; stdout is read by a thread into a queue."""

    def __init__(self, listen: str, admin_listen: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--listen", listen, "--admin-listen", admin_listen],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr_text = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, marker: str, deadline: float) -> list[str]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} in demo output within the deadline: {self.seen!r}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=STOP_DEADLINE)
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(
                    f"demo exited with {self.proc.returncode} before {marker!r}: {self.seen!r}\n{stderr}"
                )
            self.seen.append(line)
            if marker in line:
                return list(self.seen)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE)
        finally:
            if self.proc.stderr:
                self.stderr_text = self.proc.stderr.read()

    def kill(self) -> None:
        """Teardown after a failure: SIGTERM first (the demo removes its data dir), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def demo() -> Iterator[tuple[Demo, str, str]]:
    require_tool("curl")
    listen = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    running = Demo(listen, admin)
    try:
        yield running, listen, admin
    finally:
        running.kill()


def _key_of(line: str) -> str | None:
    match = re.search(r"User-ID:\s*([^'\"]+)", line)
    return match.group(1).strip() if match else None


def test_demo_printed_curl_lines_work(demo: tuple[Demo, str, str]) -> None:
    running, listen, admin = demo
    output = running.read_until("Ctrl+C", time.monotonic() + START_DEADLINE)
    curl_lines = [line for line in output if line.startswith("curl ")]
    assert curl_lines, output

    # The printed lines use the addresses actually bound.
    for line in curl_lines:
        assert f"http://{listen}/" in line or f"http://{admin}/" in line, line
    # Every group and its two pods are listed.
    for group in GROUPS:
        assert any(
            line.strip().startswith(f"{group}:") and f"{group}-a" in line and f"{group}-b" in line
            for line in output
        ), output
    data_dir = Path(
        next(line.split(":", 1)[1].strip() for line in output if line.strip().startswith("data:"))
    )

    writes = [line for line in curl_lines if "-X POST" in line and _key_of(line)]
    reads = [line for line in curl_lines if "-X POST" not in line and f"http://{listen}/orders" in line]
    keyless = [line for line in curl_lines if "-X POST" in line and not _key_of(line)]
    admin_lines = [line for line in curl_lines if f"http://{admin}/" in line]
    assert {_key_of(line) for line in writes} >= {"alice", "bob"}
    assert reads and keyless
    assert any("/debug/route" in line for line in admin_lines)
    assert any("/debug/ring" in line for line in admin_lines)
    assert any("/metrics" in line for line in admin_lines)
    assert any(line.startswith("shardgate route --config ") for line in output)

    written: dict[str, list[int]] = {}
    for line in curl_lines:
        result = run_curl(line)
        if line in writes:
            key = _key_of(line)
            assert key is not None
            owner = contract_owner(key)
            assert result.status == 201, (line, result)
            body = result.json()
            assert body["group"] == owner, (key, body)
            assert body["pod"] in (f"{owner}-a", f"{owner}-b")
            assert result.headers.get("x-shard-group") == owner
            assert result.headers.get("x-request-id")
            written.setdefault(key, []).append(body["order_id"])
        elif line in reads:
            key = _key_of(line)
            assert key is not None and key in written, "the read is printed after the key's write"
            assert result.status == 200, (line, result)
            body = result.json()
            assert body["user"] == key
            assert body["served_by"]["group"] in GROUPS
            assert result.headers.get("x-shard-group") == body["served_by"]["group"]
            owner = contract_owner(key)
            mine = [(o["group"], o["order_id"]) for o in body["orders"]]
            for order_id in written[key]:
                assert (owner, order_id) in mine, (key, body)
        elif line in keyless:
            assert result.status == 400, (line, result)
            assert result.json()["error"] == "missing_shard_key"
        elif "/metrics" in line:
            assert result.status == 200, (line, result)
            assert result.body.strip()
        else:
            assert result.status == 200, (line, result)
            assert result.headers.get("content-type", "").startswith("application/json"), result
            document = result.json()
            if "/debug/route" in line:
                assert owner_in(document, contract_owner("alice")), document

    # A client cannot steer a write with its own X-Shard-Group: the gateway drops it and sends the
    # owner's, which the demo pod checks (a pod of another group would answer 421).
    spoofed = next(group for group in GROUPS if group != contract_owner("alice"))
    line = next(line for line in writes if _key_of(line) == "alice")
    result = run_curl(f"{line} -H {shlex.quote(f'X-Shard-Group: {spoofed}')}")
    assert result.status == 201, result
    assert result.json()["group"] == contract_owner("alice")
    written["alice"].append(result.json()["order_id"])

    # The pods run the backend fence: a write sent straight to a pod of another group (no
    # gateway, no X-Shard-Group) is refused before the handler runs, with the owner named.
    pod_urls = {
        line.strip().split(":", 1)[0]: re.findall(r"http://[0-9.]+:[0-9]+", line)
        for line in output
        if line.strip().split(":", 1)[0] in GROUPS
    }
    direct = next(line for line in writes if _key_of(line) == "alice").replace(
        f"http://{listen}/orders", f"{pod_urls[spoofed][0]}/orders"
    )
    result = run_curl(direct)
    assert result.status == 421, result
    assert result.headers.get("x-shard-fence") == "misdirected_write", result
    assert (result.json()["error"], result.json()["owner"]) == ("misdirected_write", contract_owner("alice"))

    # Strict ownership, seen from the shards themselves: each write sits in its owner's file only.
    for key, order_ids in written.items():
        owner = contract_owner(key)
        for group in GROUPS:
            with contextlib.closing(sqlite3.connect(shard_path(data_dir, group))) as conn:
                rows = conn.execute("SELECT order_id FROM orders WHERE user_id = ?", (key,)).fetchall()
            if group == owner:
                assert sorted(order_ids) == sorted(row[0] for row in rows)
            else:
                assert rows == []

    assert running.stop() == 0, running.stderr_text


def test_demo_adds_group_4_through_a_hand_off_as_its_banner_says(demo: tuple[Demo, str, str]) -> None:
    running, _listen, admin = demo
    output = running.read_until("Ctrl+C", time.monotonic() + START_DEADLINE)
    plan = next(line for line in output if line.startswith("shardgate plan "))
    copy = next(line for line in output if line.startswith("cp "))
    mover_line = next(line for line in output if line.startswith("curl ") and f"-> {ADDED_GROUP}" in line)
    mover = _key_of(mover_line)
    assert mover is not None

    planned = subprocess.run(
        [sys.executable, "-m", "gateway", *shlex.split(plan)[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert planned.returncode == 0 and ADDED_GROUP in planned.stdout, planned

    ring = run_curl(f"curl -s http://{admin}/debug/ring").json()
    generation = ring["config"]["generation"]
    assert [group["name"] for group in ring["groups"]] == list(GROUPS)
    before = run_curl(mover_line)
    assert before.status == 201 and before.json()["group"] != ADDED_GROUP, before

    subprocess.run(shlex.split(copy), check=True, timeout=10)
    deadline = time.monotonic() + 30
    while True:
        config = run_curl(f"curl -s http://{admin}/debug/ring").json()["config"]
        handoff = config.get("handoff") or {}
        committed = str(handoff.get("last_outcome", "")).startswith("committed")
        # (the leader's view says committed; the routing snapshot must hold that state too)
        if committed and config["generation"] == handoff.get("generation") > generation:
            break
        assert time.monotonic() < deadline, config
        time.sleep(0.2)  # polling the admin API: there is no event to wait on
    assert handoff["phase"] == "stable", handoff
    groups = run_curl(f"curl -s http://{admin}/debug/ring").json()["groups"]
    assert [group["name"] for group in groups] == [*GROUPS, ADDED_GROUP]

    after = run_curl(mover_line)
    assert after.status == 201, after
    assert after.json()["group"] == ADDED_GROUP
    data_dir = Path(
        next(line.split(":", 1)[1].strip() for line in output if line.strip().startswith("data:"))
    )
    with contextlib.closing(sqlite3.connect(shard_path(data_dir, ADDED_GROUP))) as conn:
        rows = conn.execute("SELECT order_id FROM orders WHERE user_id = ?", (mover,)).fetchall()
    assert [row[0] for row in rows] == [after.json()["order_id"]]
    assert running.stop() == 0, running.stderr_text


def owner_in(document: Any, owner: str) -> bool:
    """The /debug/route answer names the owner (its exact shape is the admin API's to choose)."""
    return owner in json.dumps(document)


def test_demo_port_taken_exits_1_with_hint() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{free_port()}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=START_DEADLINE,
            check=False,
        )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "--listen" in done.stderr
    assert "curl " not in done.stdout
