"""Locating (and, as root on Debian/Ubuntu, installing) the external tools the benchmark drives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable

# nginx and haproxy live in sbin, which a non-root PATH often lacks.
_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# tool -> Debian package
PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}


class ToolError(RuntimeError):
    pass


def which(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_DIRS)
    return shutil.which(tool, path=path)


def find_tool(tool: str) -> str:
    found = which(tool)
    if found is None:
        raise ToolError(f"{tool} is not installed")
    return found


def ensure_tools(tools: Iterable[str], *, install: bool) -> None:
    """Make sure every tool is on the machine; apt-get install the missing ones if allowed."""
    missing = sorted({tool for tool in tools if which(tool) is None})
    if not missing:
        return
    packages = [PACKAGES[tool] for tool in missing]
    if not install:
        raise ToolError(f"missing: {', '.join(missing)} (install: apt-get install -y {' '.join(packages)})")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolError(
            f"missing: {', '.join(missing)}; run as root on Debian/Ubuntu to let the benchmark"
            f" install them, or: sudo apt-get install -y {' '.join(packages)}"
        )
    print(f"bench: installing {', '.join(packages)} with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        result = subprocess.run(argv, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if result.returncode != 0:
            raise ToolError(f"{' '.join(argv)} failed with status {result.returncode}")
    still_missing = [tool for tool in missing if which(tool) is None]
    if still_missing:
        raise ToolError(f"still missing after apt-get install: {', '.join(still_missing)}")


def version(tool: str) -> str:
    """First line of the tool's version banner ('' if unavailable)."""
    flag = {"nginx": "-v", "haproxy": "-v", "wrk": "-v"}[tool]
    path = which(tool)
    if path is None:
        return ""
    try:
        result = subprocess.run([path, flag], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else ""
