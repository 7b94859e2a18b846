"""checkov on deploy/ (raw manifests and every rendered kustomization) and on the Dockerfile.

checkov lives in its own virtualenv, ``.venv-checkov`` (``make checkov-venv``), because its pins
conflict with the kubernetes client the gateway uses. It runs once per module (it takes seconds),
offline (``--skip-download``: no severities, so nothing is filtered by them): every finding must
pass or be skipped on purpose. Skips are declared next to what they excuse, each with a reason a
reader can judge: ``# checkov:skip=ID:reason`` comments in the Dockerfile, and for Kubernetes
objects the ``checkov.io/skipN: "ID=reason"`` annotations (checkov ignores skip comments in
Kubernetes YAML and reads only these annotations, which also survive kustomize rendering).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, REPO_ROOT, Rendered, rel
from tests.support import env_with_tools, require_tool

CHECKOV_TIMEOUT = 600.0
# Every check skipped anywhere, and why it is acceptable here; a new skip must be added on purpose.
ACCEPTED_SKIPS = {
    "CKV_K8S_15": "imagePullPolicy IfNotPresent with immutable release tags",
    "CKV_K8S_38": "the gateway needs its service-account token for its watches",
    "CKV_K8S_43": "the image digest is only known once an image is published",
}
SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")
SKIP_COMMENT = re.compile(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?")
MIN_REASON = 30  # characters: a reason, not a placeholder


@dataclass
class Report:
    framework: str
    passed: int
    failed: list[dict[str, Any]]
    skipped: list[dict[str, Any]]


def _reports(output: str) -> Iterator[Report]:
    data = json.loads(output)
    for item in data if isinstance(data, list) else [data]:
        results = item.get("results")
        if not results:  # checkov's shape for "nothing of this kind found"
            continue
        yield Report(
            item["check_type"],
            int(item["summary"]["passed"]),
            results.get("failed_checks", []),
            results.get("skipped_checks", []),
        )


def _checkov(binary: str, env: dict[str, str], target: list[str], frameworks: list[str]) -> list[Report]:
    command = [
        binary,
        *target,
        "--framework",
        *frameworks,
        "--skip-download",  # offline: no guidelines or policies from the vendor's platform
        "--output",
        "json",
        "--compact",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHECKOV_TIMEOUT, env=env, check=False
    )
    # Exit 1 means "failed checks" (reported below); anything else without JSON is a crash.
    try:
        return list(_reports(result.stdout))
    except json.JSONDecodeError:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        ) from None


@pytest.fixture(scope="module")
def checkov_reports() -> list[Report]:
    binary = require_tool("checkov")
    # checkov's kustomize framework runs the kubectl it finds on PATH: the test extra's one.
    env = env_with_tools(require_tool("kubectl"), BC_SKIP_MAPPING="TRUE", PYTHONWARNINGS="ignore")
    jobs = [
        (["--directory", rel(DEPLOY)], ["kubernetes", "kustomize"]),
        (["--file", "Dockerfile"], ["dockerfile"]),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: _checkov(binary, env, *job), jobs))
    return [report for reports in results for report in reports]


def _describe(check: dict[str, Any]) -> str:
    return f"{check['check_id']} {check.get('check_name', '')} - {check['resource']} ({check['file_path']})"


def test_checkov_ran_every_framework(checkov_reports: list[Report]) -> None:
    ran = {report.framework for report in checkov_reports if report.passed}
    expected = {"kubernetes", "dockerfile", "kustomize"}
    assert expected <= ran, f"checkov reported nothing for {sorted(expected - ran)}"


def test_checkov_finds_no_failed_check(checkov_reports: list[Report]) -> None:
    failed = [f"[{r.framework}] {_describe(check)}" for r in checkov_reports for check in r.failed]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)


def test_checkov_skips_are_the_declared_ones(checkov_reports: list[Report]) -> None:
    skipped = {check["check_id"] for r in checkov_reports for check in r.skipped}
    assert skipped <= ACCEPTED_SKIPS.keys(), f"undeclared skips: {sorted(skipped - ACCEPTED_SKIPS.keys())}"


# --- the skips themselves, read from the sources (these need no checkov) --------------------------


def declared_skips(rendered: Rendered) -> list[tuple[str, str, str]]:
    """(where, check id, reason) of every skip in the rendered manifests and the Dockerfile."""
    found: list[tuple[str, str, str]] = []
    for doc in rendered.all():
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if SKIP_ANNOTATION.match(key):
                check_id, _, reason = str(value).partition("=")
                found.append((f"{doc['kind']}/{doc['metadata']['name']}", check_id, reason))
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        match = SKIP_COMMENT.search(line)
        if match:
            found.append(("Dockerfile", match.group(1), match.group(2) or ""))
    return found


def test_every_skip_has_a_reason_a_reader_can_judge(rendered: Rendered) -> None:
    skips = declared_skips(rendered)
    assert skips, "expected the documented skips (see ACCEPTED_SKIPS)"
    for where, check_id, reason in skips:
        assert check_id in ACCEPTED_SKIPS, f"{where}: {check_id} is not an accepted skip"
        assert len(reason.strip()) >= MIN_REASON, f"{where}: {check_id} needs a real reason"
        # checkov splits the annotation value at "=": a second one would break its parser.
        assert "=" not in reason, f"{where}: {check_id}: no '=' in the reason"


def test_no_skip_comment_is_silently_ignored() -> None:
    """`# checkov:skip=` in Kubernetes YAML does nothing; such a skip must be an annotation."""
    for path in DEPLOY.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not SKIP_COMMENT.search(line), f"{rel(path)}:{number}: use a checkov.io/skipN annotation"
