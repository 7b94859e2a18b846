"""A benchmark run records which build it measured without naming the machine's paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.build import DATA_PLANE, probe_build

ROOT = Path(__file__).resolve().parents[2]


def test_a_recorded_build_names_its_modules_from_the_directory_that_holds_gateway() -> None:
    build = probe_build(sys.executable, os.environ, ROOT)
    assert build.error is None and build.package_dir == str(ROOT / "gateway")  # absolute, for /proc maps
    recorded = build.to_json()
    assert recorded["package_dir"] == "gateway"
    assert set(recorded["modules"]) == set(DATA_PLANE)
    for name, path in recorded["modules"].items():
        assert path.startswith(name.replace(".", "/")) and not Path(path).is_absolute(), (name, path)
