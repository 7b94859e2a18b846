"""Every external program the tests run comes from a package that `make test` installs.

`make test` must pass on a new machine (Debian 12 with Python 3.11, nothing installed by hand):
the Makefile's SYSTEM_TOOLS go in with apt-get, the `test` extra of pyproject.toml with pip, and
checkov into its own venv. tests/support.py TOOLS says where each program comes from; these
tests hold the three together, so a new tool cannot sneak in undeclared, and a Debian package
name that no package source offers (as `kubectl` once was) is caught before a new machine is.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.support import REPO_ROOT, TOOLS, Source, Tool, require_tool

TESTS = REPO_ROOT / "tests"
MAKEFILE = REPO_ROOT / "Makefile"
# As the before-stop hook reads it: sed -n 's/^SYSTEM_TOOLS[[:space:]]*:*=[[:space:]]*//p'
SYSTEM_TOOLS_LINE = re.compile(r"^SYSTEM_TOOLS[ \t]*:*=[ \t]*(.*)$", re.MULTILINE)
APT_TIMEOUT = 60.0


def system_tools() -> dict[str, str]:
    """The Makefile's SYSTEM_TOOLS: command -> Debian package."""
    lines = SYSTEM_TOOLS_LINE.findall(MAKEFILE.read_text())
    assert len(lines) == 1, f"expected one SYSTEM_TOOLS line in the Makefile, found {lines}"
    entries = lines[0].split()
    assert all(re.fullmatch(r"[\w.+-]+:[a-z0-9][a-z0-9.+-]+", e) for e in entries), entries
    return dict(entry.split(":") for entry in entries)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def extra_packages() -> set[str]:
    """The distribution names in pyproject's `test` extra."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"]["test"]
    return {normalized(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def checkov_venv_installs(package: str) -> bool:
    """The Makefile's checkov-venv recipe pip-installs ``package`` into .venv-checkov."""
    recipe = re.compile(rf"\$\(CHECKOV_VENV\)/bin/pip install[^\n]*'{re.escape(package)}[<>=!~' ]")
    return bool(recipe.search(MAKEFILE.read_text()))


def python_files() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(TESTS.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def calls(tree: ast.Module, name: str) -> Iterator[ast.Call]:
    """Calls of a function called ``name``, plain or as an attribute (``shutil.which``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or (
                isinstance(func, ast.Attribute) and func.attr == name
            ):
                yield node


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', 0)}"


# --- the Debian packages ---------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(set(system_tools().values())))
def test_every_debian_package_the_makefile_names_is_offered(package: str) -> None:
    """`apt-cache show` knows it, and a package source (not only this machine's dpkg status) has it.

    An installed package shows up in `apt-cache show` even when no source offers it any more (a
    kubectl from a vendor's repository that was removed): a new machine could not install that.
    """
    apt_cache = require_tool("apt-cache")
    shown = subprocess.run(
        [apt_cache, "show", package], capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
    )
    assert shown.returncode == 0, f"apt-cache show {package}: {shown.stderr.strip()} (a Debian package?)"
    policy = subprocess.run(
        [apt_cache, "policy", package], capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
    ).stdout
    assert re.search(r"^\s+-?\d+ (https?|file):", policy, re.MULTILINE), (
        f"no package source offers {package} (run apt-get update if the lists are empty):\n{policy}"
    )


# --- the registry against what make test installs ---------------------------------------------


@pytest.mark.parametrize("tool", TOOLS.values(), ids=list(TOOLS))
def test_every_registered_tool_comes_from_a_package_make_test_installs(tool: Tool) -> None:
    if tool.source is Source.APT:
        assert system_tools().get(tool.name) == tool.package, (
            f"{tool.name}: the Makefile's SYSTEM_TOOLS needs {tool.name}:{tool.package}"
        )
    elif tool.source is Source.PYPI:
        assert normalized(tool.package) in extra_packages(), (
            f"{tool.name}: pyproject's `test` extra lacks {tool.package}"
        )
    else:
        assert checkov_venv_installs(tool.package), (
            f"{tool.name}: the checkov-venv recipe lacks {tool.package}"
        )


def test_every_require_tool_call_names_a_registered_tool() -> None:
    found: set[str] = set()
    for path, tree in python_files():
        for call in calls(tree, "require_tool"):
            first = call.args[0] if call.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                # Only the tests of require_tool below pass it a name held in a variable.
                assert path == Path(__file__).resolve(), (
                    f"{where(path, call)}: require_tool() takes a literal name, so this test can check it"
                )
                continue
            assert first.value in TOOLS, (
                f"{where(path, call)}: {first.value!r} is not in tests/support.py TOOLS"
            )
            found.add(first.value)
    # The registry holds no tool that no test uses (it would be installed for nothing).
    assert found == set(TOOLS), f"registered but never required: {sorted(set(TOOLS) - found)}"


def test_no_test_looks_a_tool_up_itself() -> None:
    """Only tests/support.py calls `which`; no test skips on a missing Python package either."""
    problems = [
        f"{where(path, call)}: {name}() — use tests.support.require_tool (or a plain import)"
        for path, tree in python_files()
        if path != Path(support.__file__).resolve()
        for name in ("which", "importorskip")
        for call in calls(tree, name)
    ]
    assert not problems, "\n".join(problems)


# --- require_tool itself -------------------------------------------------------------------------

MISSING = Tool("shardgate-no-such-tool", Source.APT, "shardgate-no-such-package")


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_a_missing_tool_skips_outside_ci_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setitem(TOOLS, MISSING.name, MISSING)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tool(MISSING.name)
    message = str(skipped.value)
    assert "shardgate-no-such-tool is not installed" in message, message
    assert "Debian package 'shardgate-no-such-package'" in message, message
    assert "apt-get install -y shardgate-no-such-package" in message, message


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_a_missing_tool_fails_on_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setitem(TOOLS, MISSING.name, MISSING)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as failed:
        require_tool(MISSING.name)
    assert "shardgate-no-such-package" in str(failed.value)


def test_test_extra_tools_are_found_in_the_venv_without_it_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`.venv/bin/python -m pytest` with the venv not activated still finds kubectl."""
    monkeypatch.setenv("PATH", str(tmp_path))
    for tool in TOOLS.values():
        if tool.source is Source.PYPI:
            assert Path(require_tool(tool.name)).parent == Path(sys.executable).parent, tool.name


def test_a_subprocess_finds_the_tool_the_test_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    kubectl = require_tool("kubectl")
    env = support.env_with_tools(kubectl)
    found = subprocess.run(
        [sys.executable, "-c", "import shutil; print(shutil.which('kubectl'))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert found.stdout.strip() == kubectl
