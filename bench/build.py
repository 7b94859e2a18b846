"""Which build of the gateway a shardgate system runs: compiled (extension modules) or pure Python.

`probe_build` runs `python -m bench.build` with the interpreter, environment and working
directory the system's gateway gets (so `SHARDGATE_PURE_PYTHON=1` has its effect there too):
it imports the data-plane modules and prints where each came from. The build is "compiled" when
`gateway.proxy.client` was loaded from an extension module (a suffix of
`importlib.machinery.EXTENSION_SUFFIXES`, e.g. `.cpython-311-x86_64-linux-gnu.so`), else
"pure". Once the gateway runs, `loaded_extensions` lists the gateway's extension modules that
its process has mapped (/proc/PID/maps): the check that the probe saw what the process runs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The modules on the request path; the build is judged by the first one.
DATA_PLANE = (
    "gateway.proxy.client",
    "gateway.proxy.exchange",
    "gateway.proxy.request_head",
    "gateway.proxy.response_head",
    "gateway.proxy.upstream",
    "gateway.proxy.pool",
    "gateway.proxy.flow",
    "gateway.proxy.http",
    "gateway.proxy.context",
    "gateway.proxy.accounting",
    "gateway.proxy.sides",
    "gateway.observability.metrics",
    "gateway.router",
    "gateway.ring",
    "gateway.topology",
)
PROBE_TIMEOUT_S = 60.0


def is_extension(path: str | None) -> bool:
    return bool(path) and any(str(path).endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


@dataclass
class BuildInfo:
    build: str  # "compiled" | "pure" | "unknown"
    modules: dict[str, str | None]  # module -> the file it was loaded from
    package_dir: str | None
    error: str | None = None
    loaded_extensions: list[str] | None = None  # gateway extension modules mapped by the running process
    compiled: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """As recorded: the files named from the directory that holds ``gateway/`` (a checkout or
        site-packages), so that a committed run names no path of the machine it ran on."""
        recorded = {**asdict(self), "mismatch": self.mismatch}
        if self.package_dir is not None:
            root = Path(self.package_dir).parent
            recorded["package_dir"] = _relative(self.package_dir, root)
            recorded["modules"] = {name: _relative(path, root) for name, path in self.modules.items()}
        return recorded

    @property
    def mismatch(self) -> str | None:
        """Why the running process does not look like the probed build (None if it does, or unknown)."""
        if self.loaded_extensions is None or self.build == "unknown":
            return None
        if self.build == "compiled" and not self.loaded_extensions:
            return "the probe found compiled modules, but the running process mapped none"
        if self.build == "pure" and self.loaded_extensions:
            return f"the probe found no compiled modules, but the process mapped {self.loaded_extensions}"
        return None


def _relative(path: str | None, root: Path) -> str | None:
    if path is None or not Path(path).is_relative_to(root):
        return path
    return str(Path(path).relative_to(root))


def describe_modules(names: Sequence[str] = DATA_PLANE) -> dict[str, Any]:
    """Import ``names`` here and say where each came from (what `python -m bench.build` prints)."""
    modules: dict[str, str | None] = {}
    errors: list[str] = []
    for name in names:
        try:
            modules[name] = getattr(importlib.import_module(name), "__file__", None)
        except Exception as exc:  # report it: the gateway itself would fail the same way
            modules[name] = None
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    package = sys.modules.get("gateway")
    package_file = getattr(package, "__file__", None)
    return {
        "modules": modules,
        "package_dir": str(Path(package_file).parent) if package_file else None,
        "error": "; ".join(errors) or None,
    }


def build_from(description: Mapping[str, Any]) -> BuildInfo:
    modules: dict[str, str | None] = dict(description.get("modules") or {})
    server = modules.get(DATA_PLANE[0])
    build = "unknown" if server is None else "compiled" if is_extension(server) else "pure"
    return BuildInfo(
        build=build,
        modules=modules,
        package_dir=description.get("package_dir"),
        error=description.get("error"),
        compiled=sorted(name for name, path in modules.items() if is_extension(path)),
    )


def probe_build(python: str, env: Mapping[str, str], cwd: Path) -> BuildInfo:
    """The build that ``python`` imports with ``env`` in ``cwd``."""
    try:
        result = subprocess.run(
            [python, "-m", "bench.build"],
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return BuildInfo("unknown", {}, None, error=f"{type(exc).__name__}: {exc}")
    try:
        description = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        error = (result.stderr.strip() or result.stdout.strip() or f"status {result.returncode}")[-500:]
        return BuildInfo("unknown", {}, None, error=error)
    return build_from(description)


def loaded_extensions(pid: int, package_dir: str | None) -> list[str] | None:
    """The gateway's extension modules that process ``pid`` has mapped (None if unreadable)."""
    if not package_dir:
        return None
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    prefix = package_dir.rstrip("/") + "/"
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith(prefix) and is_extension(path):
            found.add(path[len(prefix) :])
    return sorted(found)


def main() -> int:
    print(json.dumps(describe_modules()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
