"""Process supervision for the benchmark: own sessions, readiness polling, clean teardown.

Every child (backends, proxies, wrk) is started in its own session, so that it does not get the
terminal's Ctrl-C and so that its whole process group (an nginx master and its worker, say) can be
signalled at once. `Supervisor.stop_all` terminates the groups in reverse start order: SIGTERM,
a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL_S = 0.05


class StartupError(RuntimeError):
    """A process did not come up (exited, or not ready before its deadline)."""


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def terminate_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group led by `proc`, wait up to `timeout`, then SIGKILL it."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # The leader is gone; make sure no member of its group (e.g. a worker) outlives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class Supervisor:
    """Starts processes with their output in `workdir/<name>.log` and stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._managed: list[Managed] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Managed:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        managed = Managed(name=name, proc=proc, log_path=log_path)
        self._managed.append(managed)
        return managed

    def stop(self, managed: Managed, timeout: float = 5.0) -> None:
        terminate_group(managed.proc, timeout)
        if managed in self._managed:
            self._managed.remove(managed)

    def stop_all(self, timeout: float = 5.0) -> None:
        # Interrupts while tearing down must not leave the remaining groups running.
        while self._managed:
            managed = self._managed.pop()
            try:
                terminate_group(managed.proc, timeout)
            except KeyboardInterrupt:
                terminate_group(managed.proc, 0.5)


def raise_nofile_limit(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE of this process (children inherit it) to at least `wanted` if allowed.

    The soft limit goes up to the hard limit; as root the hard limit goes up too (to `wanted`,
    at most fs.nr_open). Returns the (soft, hard) limits in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if hard != infinite and hard < wanted and os.geteuid() == 0:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = wanted
        new_hard = min(wanted, nr_open)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new_hard), new_hard))
            soft, hard = max(soft, new_hard), new_hard
    target = wanted if hard == infinite else min(max(wanted, soft), hard)
    if soft != infinite and soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the kernel for `count` distinct free TCP ports (held open together, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_status(
    host: str,
    port: int,
    method: str = "GET",
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 1.0,
) -> int | None:
    """One HTTP request; the status code, or None if the connection or exchange failed."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    watch: Sequence[Managed] = (),
) -> None:
    """Poll `check` until it is true; fail fast if a watched process exits, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        for managed in watch:
            if not managed.alive():
                raise StartupError(
                    f"{managed.name} exited with status {managed.proc.returncode} while waiting for"
                    f" {what}; last log lines:\n{managed.log_tail()}"
                )
        if check():
            return
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {m.name} log ---\n{m.log_tail()}" for m in watch)
            raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(POLL_INTERVAL_S)
