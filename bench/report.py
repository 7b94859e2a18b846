"""Aggregating runs into medians and ratios; the stdout table and the JSON document."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.wrk import WrkResult

BASELINE = "nginx"


@dataclass
class SystemRecord:
    name: str
    reference: bool = False
    runs: list[WrkResult] = field(default_factory=list)
    failure: str | None = None  # why the system could not start or stopped taking part

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def status(self) -> str:
        if self.failure is not None:
            return "failed"
        if not self.runs:
            return "not-run"
        return "errors" if self.errors else "ok"

    def median(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs]
        return statistics.median(values) if values else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def summarize(records: list[SystemRecord], params: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    by_name = {record.name: record for record in records}
    baseline = by_name.get(BASELINE)
    base_rps = baseline.median("rps") if baseline and baseline.status in ("ok", "errors") else None
    base_p99 = baseline.median("p99_ms") if baseline and baseline.status in ("ok", "errors") else None
    systems: dict[str, Any] = {}
    for record in records:
        rps, p50, p99 = record.median("rps"), record.median("p50_ms"), record.median("p99_ms")
        entry: dict[str, Any] = {
            "status": record.status,
            "reference": record.reference,
            "failure": record.failure,
            "errors": record.errors,
            "median": {"rps": rps, "p50_ms": p50, "p99_ms": p99},
            "runs": [run.to_json() for run in record.runs],
        }
        if not record.reference:
            entry["ratio_to_nginx"] = {"rps": _ratio(rps, base_rps), "p99": _ratio(p99, base_p99)}
        systems[record.name] = entry
    return {"params": params, "host": host, "baseline": BASELINE, "systems": systems}


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(summary: dict[str, Any]) -> str:
    headers = ["system", "req/s", "p50", "p99", "rps/nginx", "p99/nginx", "runs", "errors", "status"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for name, entry in summary["systems"].items():
        median = entry["median"]
        ratio = entry.get("ratio_to_nginx") or {}
        runs = entry["runs"]
        non2xx = sum(run["non_2xx"] for run in runs)
        socket = sum(sum(run["socket_errors"].values()) for run in runs)
        errors = "0" if not entry["errors"] else f"!! {non2xx} non-2xx, {socket} socket"
        label = f"{name} (ref)" if entry["reference"] else name
        status = entry["status"].upper() if entry["status"] != "ok" else "ok"
        rows.append(
            [
                label,
                _fmt(median["rps"], ",.0f"),
                _fmt(median["p50_ms"], ".2f", " ms"),
                _fmt(median["p99_ms"], ".2f", " ms"),
                _fmt(ratio.get("rps"), ".2f", "x") if not entry["reference"] else "",
                _fmt(ratio.get("p99"), ".2f", "x") if not entry["reference"] else "",
                str(len(runs)),
                errors,
                status,
            ]
        )
        if entry["failure"]:
            lines = [text.strip() for text in entry["failure"].splitlines() if text.strip()] or ["?"]
            detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            notes.append(f"  {name}: FAILED: {detail}")
        elif entry["errors"]:
            notes.append(f"  {name}: {entry['errors']} failed requests; its figures are not comparable")
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    right = {1, 2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()

    params = summary["params"]
    title = (
        f"wrk -t{params['threads']} -c{params['connections']} -d{params['duration_s']}s"
        f" (warmup {params['warmup_s']}s), {params['runs']} run(s) per system, medians;"
        " ratios vs nginx (rps: higher is better, p99: lower is better)"
    )
    out = [title, line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    if notes:
        out += ["", "Flagged:", *notes]
    return "\n".join(out)
