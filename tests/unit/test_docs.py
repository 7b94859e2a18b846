"""The documents stay inside the repository and agree with the code.

- Every relative link in the README, ``docs/``, ``bench/README.md`` and ``CHANGELOG.md``
  resolves to a file (or folder) of the repository, and a ``#fragment`` to a heading of the
  linked Markdown file; none of them, nor a committed benchmark run, names a path of a
  development machine.
- The errors table of ``docs/contract.md`` lists exactly the (status, code) pairs the gateway
  can send: the pairs written as literals in ``gateway/`` calls (``Refusal(400, "...")``,
  ``fail(exchange, 502, "...")``, ``_error(400, "...")``, ...), and the expected list below.
- The README's Performance section links the benchmark run it quotes (committed under
  ``bench/results/``), and every figure in its table is a figure of that run.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "docs" / "contract.md"

# Paths that exist only on a development machine, never in a clone.
OUTSIDE_PATHS = ("../shared", "/work/")

# The contract's errors: what the gateway sends itself. (There is no constant list of codes in
# gateway/; the scan below finds the literals. ``internal_error`` is a contract change being
# implemented; see test_the_gateway_sends_every_code_of_the_table.)
EXPECTED_ERRORS = {
    (400, "missing_shard_key"),
    (400, "invalid_shard_key"),
    (400, "bad_request"),
    (413, "body_too_large"),
    (429, "rate_limited"),
    (431, "headers_too_large"),
    (500, "internal_error"),
    (502, "upstream_error"),
    (503, "shard_unavailable"),
    (503, "not_ready"),
    (503, "shard_moving"),
    (504, "upstream_timeout"),
}
# ...and the backend fence's (gateway/fence.py), in their own table of the same section.
FENCE_ERRORS = {
    (421, "misdirected_write"),
    (421, "shard_moving"),
    (503, "shard_state_unconfirmed"),
}

# The demo's pods are backends, not the gateway: their own error codes are not the contract's.
NOT_THE_GATEWAY = {ROOT / "gateway" / "demo.py"}


def documents() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", *docs]


_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _without_code(text: str) -> str:
    """Markdown text with fenced blocks and code spans blanked (links in code are not links)."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _CODE_SPAN.sub("code", text)


def links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_the_documents_exist() -> None:
    for path in documents():
        assert path.is_file(), path
    assert CONTRACT in documents()


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path: Path) -> None:
    problems = []
    for target in links(path):
        if not target or _SCHEME.match(target):
            continue  # https:, mailto: and the like
        file_part, _, fragment = target.partition("#")
        if file_part.startswith("/"):
            problems.append(f"{target}: absolute path (link relative to the file instead)")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        try:
            resolved.relative_to(ROOT)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def recorded_runs() -> list[Path]:
    """The committed benchmark runs (``latest.*`` is each machine's own, and git ignores it)."""
    results = ROOT / "bench" / "results"
    return sorted(p for p in results.glob("*.*") if p.suffix in (".json", ".md") and p.stem != "latest")


@pytest.mark.parametrize("path", documents() + recorded_runs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_outside_the_repository_is_named(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    found = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for needle in (*OUTSIDE_PATHS, str(ROOT) + "/")
        for m in re.finditer(re.escape(needle) + r"\S*", text)
    ]
    assert not found, "\n".join(found)


def test_the_link_checker_sees_links() -> None:
    # A checker that finds nothing passes everything: make sure it reads the README's links.
    assert "docs/contract.md" in links(ROOT / "README.md")
    assert "errors" in anchors(CONTRACT)


# ---------------------------------------------------------------------------------------------
# The errors table


def contract_errors() -> set[tuple[int, str]]:
    """(status, code) rows of the table under the contract's "## Errors" heading."""
    text = CONTRACT.read_text(encoding="utf-8")
    section = re.search(r"^## Errors\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section is not None, "docs/contract.md has no '## Errors' section"
    rows = re.findall(r"^\|\s*(\d{3})\s*\|\s*`([a-z_]+)`\s*\|", section.group(1), re.MULTILINE)
    return {(int(status), code) for status, code in rows}


def _status_and_code(call: ast.Call) -> list[tuple[int, str]]:
    """(status, code) literal pairs among a call's arguments: ``f(..., 503, "not_ready", ...)``
    or ``f(status=503, code="not_ready")``."""
    found = []
    args = call.args
    for first, second in itertools.pairwise(args):
        if (
            isinstance(first, ast.Constant)
            and type(first.value) is int
            and 400 <= first.value <= 599
            and isinstance(second, ast.Constant)
            and isinstance(second.value, str)
            and re.fullmatch(r"[a-z]+(_[a-z]+)*", second.value)
        ):
            found.append((first.value, second.value))
    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    status, code = keywords.get("status"), keywords.get("code")
    if isinstance(status, ast.Constant) and isinstance(code, ast.Constant):
        if type(status.value) is int and isinstance(code.value, str):
            found.append((status.value, code.value))
    return found


def codes_in_the_gateway() -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path in NOT_THE_GATEWAY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                found.update(_status_and_code(node))
    return found


def test_the_errors_table_lists_the_expected_codes() -> None:
    assert contract_errors() == EXPECTED_ERRORS | FENCE_ERRORS


def test_the_gateway_sends_no_code_missing_from_the_table() -> None:
    sent = codes_in_the_gateway()
    assert len(sent) >= 5, f"the scan of gateway/ found almost nothing: {sent}"
    assert sent <= contract_errors(), f"not in docs/contract.md's errors table: {sent - contract_errors()}"


@pytest.mark.parametrize("error", sorted(EXPECTED_ERRORS), ids=lambda error: f"{error[0]}-{error[1]}")
def test_the_gateway_sends_every_code_of_the_table(error: tuple[int, str]) -> None:
    assert error in codes_in_the_gateway()


# -- the README's performance figures are those of the committed run it links -------------------

_RECORDED_RUN = re.compile(r"\]\((bench/results/[\w.-]+\.md)\)")
_FIGURE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?x?")


def _readme_performance_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Performance\n")
    return text[start : text.index("\n## ", start + 1)]


def _first_table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table[2:]]


def test_the_readme_quotes_a_committed_benchmark_run() -> None:
    runs = _RECORDED_RUN.findall(_readme_performance_section())
    assert runs, "the Performance section links the run under bench/results/ that it quotes"
    for run in runs:
        assert (ROOT / run).is_file() and (ROOT / run).with_suffix(".json").is_file(), run


def test_every_figure_of_the_readme_performance_table_is_in_that_run() -> None:
    section = _readme_performance_section()
    recorded = (ROOT / _RECORDED_RUN.findall(section)[0]).read_text(encoding="utf-8")
    figures_of_the_run = set(_FIGURE.findall(recorded))
    rows = _first_table_rows(section)
    assert len(rows) >= 5
    for row in rows:
        for cell in row[1:-1]:  # the metric's name and the target are not measurements
            for figure in _FIGURE.findall(cell):
                assert figure in figures_of_the_run, f"{figure} ({row[0]}) is not in the recorded run"
