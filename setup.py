"""Compiles the data-plane modules listed in gateway/build.py with Cython, when it can.

pyproject.toml holds the project's metadata; this file only adds ``ext_modules``. Each listed
module ``gateway/x.py`` becomes an extension module beside it (Cython 3, pure-Python mode: the
``.py`` file is the source, with a ``.pxd`` beside it if there is one), and the ``.py`` file is
installed too, for ``SHARDGATE_PURE_PYTHON=1``.

- ``SHARDGATE_NO_EXTENSIONS=1`` at install time compiles nothing: a pure-Python install.
- No C compiler or no Python headers, or a module that fails to compile: a warning, and the
  install goes on with the plain ``.py`` module(s). (tests/unit/test_build.py fails on CI when
  a compiler is there but a listed module is not compiled, so a broken build is not missed.)
"""

from __future__ import annotations

import os
import platform
import runpy
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# gateway/build.py run as a file: the module list without importing the package (and its deps).
BUILD: dict[str, Any] = runpy.run_path(str(HERE / "gateway" / "build.py"))

# Cython directives (the defaults are kept where they are the safe choice):
# - language_level 3: Python 3 semantics (str is unicode, true division, absolute imports).
# - binding True (Cython 3's default, stated): functions and methods are introspectable like
#   Python ones (inspect.signature, __doc__, __module__), which tests and tracebacks use.
# - boundscheck / wraparound stay on: the modules index Python lists and bytes (``[-1]`` too)
#   with Python ints, where switching the checks off buys nothing measurable and is unsafe.
# - annotation_typing off: the annotations are for mypy and readers, not C types. (On, Cython
#   turns ``now: float`` into a C double and ``reason: int`` into an exact-int check, so a value
#   Python would accept raises TypeError only in the compiled build; and a .pxd could not declare
#   ``reason`` as a C int.) The C types are the ones a .pxd beside the module declares.
DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}


def warn(message: str) -> None:
    line = "*" * 78
    print(f"{line}\n* shardgate: {message}\n{line}", file=sys.stderr)


def extensions() -> list[Extension]:
    if BUILD["no_extensions_requested"]():
        warn(f"{BUILD['NO_EXTENSIONS_ENV']} is set: installing pure Python (slower data plane)")
        return []
    if platform.python_implementation() != "CPython":
        warn("not CPython: installing pure Python")
        return []
    if not BUILD["c_compiler_available"]():
        warn("no C compiler or Python headers: installing pure Python (slower data plane)")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        warn("Cython is not installed: installing pure Python (slower data plane)")
        return []
    compiled: list[Extension] = []
    for name in BUILD["listed_modules"](HERE):
        source = Path(*name.split(".")).with_suffix(".py")
        try:
            compiled += cythonize(
                [Extension(name, [str(source)])],
                compiler_directives=DIRECTIVES,
                build_dir="build/cython",  # the generated C stays out of the source tree
                quiet=True,
            )
        except Exception as exc:  # Cython's CompileError, or anything it raised on this module
            warn(f"Cython could not translate {source} ({exc}): it stays pure Python")
    return compiled


class OptionalBuildExt(build_ext):
    """build_ext where a module that fails to compile stays pure Python (with a warning).

    Built in place (``pip install -e .``, ``make compile``), an extension module shadows the
    ``.py`` beside it, so one left over from an earlier build (a module no longer listed, renamed,
    or failing to compile now) is deleted rather than left to run old code.
    """

    def run(self) -> None:
        if self.inplace:
            wanted = {Path(self.get_ext_fullpath(ext.name)).resolve() for ext in self.extensions}
            for path in (HERE / "gateway").rglob("*" + sysconfig.get_config_var("EXT_SUFFIX")):
                if path.resolve() not in wanted:
                    print(
                        f"shardgate: removing {path.relative_to(HERE)} (not built any more)", file=sys.stderr
                    )
                    path.unlink()
        super().run()

    def build_extensions(self) -> None:
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # CCompilerError, DistutilsExecError, a missing header, ...
            warn(f"could not compile {ext.name} ({exc}): it stays pure Python")
            stale = Path(self.get_ext_fullpath(ext.name))
            if self.inplace and stale.exists():
                stale.unlink()


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
