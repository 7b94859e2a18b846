"""The container image, without a Docker engine: lint the Dockerfile, check its contract, and build
the same wheel from the same files and run it in a fresh virtualenv.

The wheel test copies exactly the files the Dockerfile's build stage COPYs (honouring
.dockerignore's allowlist) into an empty directory, builds the wheel there as the image does, and
installs it, with its dependencies, into a new venv outside the repository; `shardgate --help`
and `shardgate validate` must then work from that venv alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import build
from tests.deploy.conftest import REPO_ROOT
from tests.support import require_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
# The runtime base and the Python it ships: it must be CI's minor version.
RUNTIME_PYTHON = {"gcr.io/distroless/python3-debian12": (3, 11)}
PIP_TIMEOUT = 600.0
# Imports every module of the installed package (the data plane, Kubernetes discovery, ...):
# `--help` alone would not notice a runtime dependency missing from the wheel's metadata.
IMPORT_EVERY_MODULE = """
import importlib, pkgutil, gateway
print(gateway.__file__)
for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
    if not module.name.endswith(".__main__"):  # that one runs the CLI
        importlib.import_module(module.name)
"""


# What the Dockerfile's build stage runs after installing the wheel.
CHECK_COMPILED = "from gateway.build import uncompiled_modules as u; m = u(); assert not m, m"


@dataclass
class Instruction:
    keyword: str
    args: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return result


def stages() -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in instructions():
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data


def copy_sources() -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (not --from another stage)."""
    pairs: list[tuple[str, str]] = []
    for stage in stages():
        for instruction in stage:
            if instruction.keyword != "COPY" or "--from=" in instruction.args:
                continue
            *sources, destination = instruction.args.split()
            pairs.extend((source, destination) for source in sources)
    return pairs


def ignored_by_dockerignore(relative: Path) -> bool:
    """Enough of .dockerignore's semantics for an allowlist: later lines win, `**/` any depth."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        for candidate in [relative, *relative.parents]:
            if candidate == Path("."):
                continue
            text = candidate.as_posix()
            if (
                pattern == "*"
                or text == pattern
                or (pattern.startswith("**/") and Path(candidate.name).match(pattern[3:]))
            ):
                ignored = not negate
                break
    return ignored


# --- lint ----------------------------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Dockerfile's contract -------------------------------------------------------------------


def test_multi_stage_build_on_ci_python() -> None:
    found = stages()
    assert len(found) >= 2, "build wheels in one stage, run from a slim one"
    runtime_from = found[-1][0].args.split()[0]
    image, _, tag = runtime_from.partition(":")
    assert tag and tag != "latest", runtime_from
    assert image in RUNTIME_PYTHON, f"unknown runtime base {image}: add its Python version"
    assert RUNTIME_PYTHON[image] == sys.version_info[:2], "the image must run CI's Python minor version"
    assert found[0][0].args.split()[-1] != found[0][0].args.split()[0], "name the build stage"


def test_runtime_stage_contract() -> None:
    runtime = stages()[-1]
    by_keyword: dict[str, list[str]] = {}
    for instruction in runtime:
        by_keyword.setdefault(instruction.keyword, []).append(instruction.args)
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["shardgate"]
    assert json.loads(by_keyword["CMD"][-1]) == ["run"]
    assert "SHELL" not in by_keyword and "RUN" not in by_keyword, "the runtime has no shell"
    healthchecks = by_keyword.get("HEALTHCHECK", [])
    assert all("CMD [" in item for item in healthchecks), "exec-form HEALTHCHECK only (no shell)"
    user = by_keyword["USER"][-1]
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) >= 10000, user
    exposed = {port for item in by_keyword["EXPOSE"] for port in item.split()}
    assert exposed == {"8080", "9090"}
    labels = " ".join(by_keyword["LABEL"])
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    version = re.search(r"(?m)^ARG VERSION=(\S+)", DOCKERFILE.read_text())
    assert version and version.group(1) == project()["version"]
    assert f'licenses="{project()["license"]}"' in labels  # an SPDX expression (PEP 639)


def test_build_stage_compiles_the_data_plane_and_the_runtime_has_no_compiler() -> None:
    build_stage, runtime = stages()[0], stages()[-1]
    build_runs = " ".join(i.args for i in build_stage if i.keyword == "RUN")
    assert re.search(r"\bgcc=\S+", build_runs) and re.search(r"\bpython3-dev=\S+", build_runs)
    assert CHECK_COMPILED in build_runs, "the build stage must fail when the wheel is not compiled"
    assert "setup.py" in {Path(source).name for source, _ in copy_sources()}
    assert not [i for i in runtime if i.keyword == "RUN"]  # (so no compiler is installed there)


def test_dockerignore_keeps_every_copied_path() -> None:
    sources = copy_sources()
    assert sources
    for source, _ in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else list(path.rglob("*.py"))
        for file in files:
            relative = file.relative_to(REPO_ROOT)
            assert not ignored_by_dockerignore(relative), f".dockerignore drops {relative}"
    assert ignored_by_dockerignore(Path("tests/unit/test_cli.py"))
    assert ignored_by_dockerignore(Path(".venv/bin/python"))
    assert ignored_by_dockerignore(Path("gateway/__pycache__/cli.cpython-311.pyc"))
    # An in-place (editable) build's extension modules: the image compiles its own.
    assert ignored_by_dockerignore(Path("gateway/proxy/server.cpython-311-x86_64-linux-gnu.so"))


# --- the wheel the image installs ----------------------------------------------------------------


def docker_context(target: Path) -> Path:
    """Recreate the build stage's WORKDIR from the Dockerfile's COPY lines (COPY semantics)."""
    workdir = target / "src"
    workdir.mkdir()
    for source, destination in copy_sources():
        src, dest = REPO_ROOT / source, workdir / destination
        if src.is_dir():  # a directory's contents go into the destination directory
            dropped = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.so")  # as .dockerignore does
            shutil.copytree(src, dest, ignore=dropped, dirs_exist_ok=True)
        else:
            dest = dest / src.name if destination.endswith("/") else dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    return workdir


def run(command: list[str], cwd: Path, timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.timeout(900)
def test_wheel_from_the_docker_context_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    context = docker_context(tmp_path)
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), "."], cwd=context)
    (wheel,) = wheels.glob("shardgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "gateway/__init__.py" in names and "gateway/cli.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    # With a C compiler here (as in the image's build stage) the data plane is compiled, unless
    # SHARDGATE_NO_EXTENSIONS=1 says not to: an extension module beside each listed module's
    # source (the source is kept, for SHARDGATE_PURE_PYTHON=1).
    compiler = build.compiling_expected()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}" if compiler else "py3-none-any"
    assert wheel.name.startswith(f"shardgate-{project()['version']}-{tag}"), wheel.name
    for module in build.listed_modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names, path
        extension = [n for n in names if n.startswith(f"{path}.") and n.endswith(".so")]
        assert bool(extension) == compiler, (path, extension)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    # As in the image: nothing installs at run time, so pip and setuptools are removed.
    run([str(python), "-m", "pip", "uninstall", "-q", "-y", "pip", "setuptools"], cwd=tmp_path)

    outside = tmp_path / "elsewhere"  # not the repository: only the installed wheel is importable
    outside.mkdir()
    shardgate = venv / "bin" / "shardgate"
    help_text = run([str(shardgate), "--help"], cwd=outside, timeout=60).stdout
    for command in ("run", "demo", "validate", "route", "plan"):
        assert command in help_text
    origin = run([str(python), "-c", IMPORT_EVERY_MODULE], cwd=outside, timeout=120)
    assert origin.stdout.startswith(str(venv)), origin.stdout  # the wheel's code, not the checkout's
    if compiler:  # the Dockerfile's own check: every listed module loads compiled
        run([str(python), "-I", "-c", CHECK_COMPILED], cwd=outside, timeout=120)
    validated = run(
        [str(shardgate), "validate", str(REPO_ROOT / "deploy" / "base" / "shards.yaml")],
        cwd=outside,
        timeout=60,
    )
    assert validated.stdout.strip()
