"""The compiled build (gateway/build.py, setup.py) and the switch to plain Python.

``make test`` runs the suite on the compiled build, then the data-plane suites again with
``SHARDGATE_PURE_PYTHON=1``: these tests check that each run really is the build it claims.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import build

REPO_ROOT = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() == "true"


def import_listed() -> list[str]:
    names = build.listed_modules()
    for name in names:
        importlib.import_module(name)
    return names


def test_the_list_names_existing_modules() -> None:
    names = build.listed_modules()
    assert "gateway.router" in names and "gateway.ring" in names
    proxy = sorted(p.stem for p in (REPO_ROOT / "gateway" / "proxy").glob("*.py") if p.stem != "__init__")
    assert [n for n in names if n.startswith("gateway.proxy.")] == [f"gateway.proxy.{m}" for m in proxy]
    assert not [n for n in names if n.endswith("__init__")]
    for name in names:
        assert (REPO_ROOT / Path(*name.split("."))).with_suffix(".py").is_file(), name


def test_listed_modules_are_compiled_unless_pure_python_was_asked_for() -> None:
    names = import_listed()
    compiled = [name for name in names if build.is_compiled(name)]
    if build.pure_python_requested():
        assert compiled == [], f"{build.PURE_PYTHON_ENV} is set, yet these loaded compiled: {compiled}"
        return
    missing = sorted(set(names) - set(compiled))
    if not missing:
        return
    reason = (
        f"not compiled: {', '.join(missing)} (installed with {build.NO_EXTENSIONS_ENV}=1, without a C "
        "compiler, or a module failed to compile: see the install's warnings)"
    )
    if ON_CI and build.compiling_expected():
        # Never test pure Python twice without noticing: a C compiler is here, so the main run
        # must be the compiled build.
        pytest.fail(reason)
    pytest.skip(reason)


def test_compiled_modules_are_not_older_than_their_source() -> None:
    """An in-place extension module shadows its .py: after an edit it must be rebuilt (make does)."""
    stale = []
    for binary in extension_modules_in_the_tree():
        source = binary.parent / (binary.name.split(".", 1)[0] + ".py")
        if not source.exists():
            continue  # the next test's business
        declarations = source.with_suffix(".pxd")
        newest = max(p.stat().st_mtime for p in (source, declarations) if p.exists())
        if newest > binary.stat().st_mtime + 1:
            stale.append(binary.relative_to(REPO_ROOT).as_posix())
    assert not stale, f"extension modules older than their source: {stale}; rebuild them (make compile)"


def extension_modules_in_the_tree() -> list[Path]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [path for path in (REPO_ROOT / "gateway").rglob("*.so") if path.name.endswith(suffixes)]


def test_every_extension_module_in_the_tree_has_its_source() -> None:
    """A module renamed or deleted must not live on as a leftover compiled file."""
    orphans = [
        path.relative_to(REPO_ROOT).as_posix()
        for path in extension_modules_in_the_tree()
        if not (path.parent / (path.name.split(".", 1)[0] + ".py")).exists()
    ]
    assert not orphans, f"extension modules without a .py beside them: {orphans}"


PROBE = """
import importlib, json, sys
from gateway import build
names = build.listed_modules()
for name in names:
    importlib.import_module(name)
print(json.dumps({
    "origins": {name: sys.modules[name].__spec__.origin for name in names},
    "compiled": build.compiled_modules(),
}))
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_pure_python_switch_loads_the_source_modules_in_a_subprocess() -> None:
    data = probe({**os.environ, build.PURE_PYTHON_ENV: "1"})
    origins = data["origins"]
    assert isinstance(origins, dict)
    assert all(str(origin).endswith(".py") for origin in origins.values()), origins
    assert data["compiled"] == []


def test_without_the_switch_a_subprocess_loads_what_this_process_loads() -> None:
    import_listed()
    env = {k: v for k, v in os.environ.items() if k != build.PURE_PYTHON_ENV}
    data = probe(env)
    if build.pure_python_requested():  # this process: the .py modules; the subprocess: the build
        assert build.compiled_modules() == []
    else:
        assert data["compiled"] == build.compiled_modules()


def test_the_finder_leaves_other_modules_alone() -> None:
    assert build.SourceOnlyFinder.find_spec("json", None) is None
    assert build.SourceOnlyFinder.find_spec("gateway.nothing_here", [str(REPO_ROOT / "gateway")]) is None
    spec = build.SourceOnlyFinder.find_spec("gateway.router", [str(REPO_ROOT / "gateway")])
    assert spec is not None and spec.origin == str(REPO_ROOT / "gateway" / "router.py")
