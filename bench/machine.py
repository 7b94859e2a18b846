"""The machine a benchmark ran on, as recorded with every report (and every committed result)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.tools import version


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpuinfo() -> dict[str, Any]:
    """Model, physical cores and whether a hypervisor is flagged (Linux /proc/cpuinfo)."""
    model = None
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    hypervisor = False
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
        elif key == "flags" and "hypervisor" in value.split():
            hypervisor = True
    return {"cpu_model": model, "physical_cores": len(cores) or None, "virtualized": hypervisor}


def _memory_kb() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return None


def _distro() -> str | None:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return None


def _git_commit(repo: Path) -> str | None:
    """Short commit of the code measured, with "+dirty" if the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def describe_machine(repo: Path) -> dict[str, Any]:
    """Everything a reader needs to judge where the figures came from (taken at the start)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    memory = _memory_kb()
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **_cpuinfo(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory / 2**20, 1) if memory else None,
        "machine": platform.machine(),
        "kernel": platform.release(),
        "distro": _distro(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_at_start": [round(value, 2) for value in load] if load else None,
        "nginx": version("nginx"),
        "haproxy": version("haproxy"),
        "wrk": version("wrk"),
        "commit": _git_commit(repo),
    }
