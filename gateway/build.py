"""Which of the gateway's modules are compiled, and the switch that runs them as plain Python.

``COMPILED`` is the one list of modules that ``setup.py`` compiles with Cython (when Cython and a
C compiler are there): a name, or ``package.*`` for every module of a package but its
``__init__``. Edit it here; ``setup.py`` reads it by running this file on its own, so this module
imports nothing but the standard library and is itself never compiled.

A compiled module is an extension module (``server.cpython-311-x86_64-linux-gnu.so``) next to
its source (``server.py``), in the wheel or, for an editable install, in the checkout; Python's
path finder prefers the extension. With ``SHARDGATE_PURE_PYTHON=1`` in the environment,
``gateway/__init__.py`` puts ``SourceOnlyFinder`` first on ``sys.meta_path``, so every
``gateway.*`` module is loaded from its ``.py`` file instead. Worker processes inherit the
environment, so they switch too.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path

# The data plane: what runs per request, and the counters every request updates (metrics.py).
# (topology.py is read per request too, but only a few attributes: see bench/dataplane.py.)
COMPILED: tuple[str, ...] = (
    "gateway.proxy.*",
    "gateway.router",
    "gateway.ring",
    "gateway.observability.metrics",
)

PURE_PYTHON_ENV = "SHARDGATE_PURE_PYTHON"  # at run time: load the .py modules
NO_EXTENSIONS_ENV = "SHARDGATE_NO_EXTENSIONS"  # at install time: compile nothing

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds gateway/


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def pure_python_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return _truthy(environ.get(PURE_PYTHON_ENV))


def no_extensions_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return _truthy(environ.get(NO_EXTENSIONS_ENV))


def listed_modules(root: Path = _PACKAGE_ROOT) -> list[str]:
    """``COMPILED`` with each ``package.*`` expanded to the modules found beside ``root``."""
    names: list[str] = []
    for entry in COMPILED:
        if entry.endswith(".*"):
            package = entry[:-2]
            directory = root.joinpath(*package.split("."))
            names.extend(
                f"{package}.{path.stem}" for path in sorted(directory.glob("*.py")) if path.stem != "__init__"
            )
        else:
            names.append(entry)
    return names


def is_compiled(module_name: str) -> bool:
    """Whether ``module_name``, as loaded in this process, is an extension module."""
    module = sys.modules.get(module_name)
    origin = getattr(getattr(module, "__spec__", None), "origin", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The ``gateway`` modules loaded in this process that are compiled, sorted (for the start-up
    log line and /debug/ring; modules not imported yet are not listed)."""
    return sorted(name for name in list(sys.modules) if name.startswith("gateway.") and is_compiled(name))


def describe() -> dict[str, object]:
    """The build this process runs, for the start-up log and /debug/ring."""
    return {"compiled": compiled_modules(), "pure_python_requested": pure_python_requested()}


def uncompiled_modules() -> list[str]:
    """The listed modules that load as plain Python here (each is imported to find out)."""
    import importlib

    names = listed_modules()
    for name in names:
        importlib.import_module(name)
    return [name for name in names if not is_compiled(name)]


class SourceOnlyFinder:
    """A meta-path finder that finds ``gateway.*`` submodules among ``.py`` files only.

    It asks the standard ``FileFinder`` of each directory of the parent package's ``__path__``,
    restricted to the source loader; whatever it does not find (nothing, normally) falls through
    to the regular finders.
    """

    _loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: object = None
    ) -> ModuleSpec | None:
        if not fullname.startswith("gateway.") or not path:
            return None
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *cls._loaders).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def install_source_only_finder() -> None:
    if SourceOnlyFinder not in sys.meta_path:
        sys.meta_path.insert(0, SourceOnlyFinder)


def c_compiler_available() -> bool:
    """Whether this Python's C compiler and its headers are installed (what building needs)."""
    import shutil
    import sysconfig

    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()  # as distutils
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return bool(compiler) and shutil.which(compiler[0]) is not None and headers.is_file()


def compiling_expected() -> bool:
    """Whether an install here compiles the listed modules: a C compiler, and not asked not to."""
    return c_compiler_available() and not no_extensions_requested()
