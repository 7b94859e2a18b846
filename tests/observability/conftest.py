"""Harness for the observability tests: real gateways, real upstreams, the gateway's own log file.

The gateway and upstream helpers of ``tests/integration`` are reused as they are, fixtures
included: they are imported here (a conftest's fixtures are only visible under its own
directory, or where they are imported).
Everything waits by polling with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (  # noqa: F401 - fixtures, found by pytest by name
    Gateway,
    module_gateway,
    module_upstreams,
    start_gateway,
    upstreams,
)
from tests.support import require_tool, wait_until

DEADLINE = 15.0  # generous: the machine is often loaded by other test runs


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or the deadline passes; the last result."""
    return wait_until(predicate, timeout, interval)


def require_promtool() -> str:
    return require_tool("promtool")


def promtool(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd
    )


# ---------------------------------------------------------------------------------------------
# The gateway's log file (stdout and stderr of the process, one JSON object per line)


@dataclass(frozen=True)
class LogView:
    entries: list[dict[str, Any]]
    not_json: list[str]  # lines that are not a JSON object

    def by(self, logger: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("logger") == logger]

    def access(self) -> list[dict[str, Any]]:
        return self.by("shardgate.access")


def read_log(gateway: Gateway) -> LogView:
    entries: list[dict[str, Any]] = []
    not_json: list[str] = []
    try:
        text = gateway.log_path.read_text(errors="replace")
    except OSError:
        return LogView([], [])
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # a line still being written
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if isinstance(doc, dict):
            entries.append(doc)
        else:
            not_json.append(line)
    return LogView(entries, not_json)


def wait_for_log(
    gateway: Gateway, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEADLINE
) -> LogView:
    """The log once some entry satisfies ``predicate``; fails with the log's tail otherwise."""
    views: list[LogView] = []

    def found() -> bool:
        views.append(read_log(gateway))
        return any(predicate(e) for e in views[-1].entries)

    assert wait_for(found, timeout, interval=0.05), f"no such log entry in {timeout}s:\n{gateway.log_tail()}"
    return views[-1]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session", autouse=True)
def _no_ambient_otel() -> Iterator[None]:
    """The gateways inherit this process's environment: OTEL_* set outside must not turn tracing
    on (or point it elsewhere) behind the tests' backs."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            patch.delenv(name)
        yield
