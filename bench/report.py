"""Aggregating runs into medians, ratios and target verdicts; the stdout table and the JSON document."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.idle import IdleResult
from bench.micro import MicroResult
from bench.wrk import WrkResult

BASELINE = "nginx"
SUBJECT = "shardgate"  # the system the targets are about

# Targets from the issue; the verdict is printed, never turned into an exit status.
TARGET_RPS_RATIO = 0.75  # throughput >= 0.75x nginx
TARGET_P99_RATIO = 1.5  # p99 <= 1.5x nginx
TARGET_ADDED_US = 150.0  # added latency at concurrency 1 (proxy p50 - direct p50)
TARGET_TRANSFER_RATIO = 0.5  # upload and download MiB/s >= 0.5x nginx
TARGET_RSS_MB = 100.0  # peak RSS with the idle connections open
TARGET_ROUTE_US = 2.0  # decide + choose_pod, median per call

PHASES = ("throughput", "latency", "transfer", "rss", "micro")


@dataclass
class SystemRecord:
    name: str
    reference: bool = False
    runs: list[WrkResult] = field(default_factory=list)  # throughput (wrk -c64)
    latency_runs: list[WrkResult] = field(default_factory=list)  # concurrency 1
    upload_runs: list[WrkResult] = field(default_factory=list)
    download_runs: list[WrkResult] = field(default_factory=list)
    idle: IdleResult | None = None
    failure: str | None = None  # why the system could not start or stopped taking part

    @property
    def wrk_runs(self) -> list[WrkResult]:
        return [*self.runs, *self.latency_runs, *self.upload_runs, *self.download_runs]

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.wrk_runs) + (self.idle.errors if self.idle else 0)

    @property
    def status(self) -> str:
        if self.failure is not None:
            return "failed"
        if not self.wrk_runs and self.idle is None:
            return "not-run"
        return "errors" if self.errors else "ok"

    def median(self, attribute: str, runs: Sequence[WrkResult] | None = None) -> float | None:
        values = [getattr(run, attribute) for run in (self.runs if runs is None else runs)]
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _diff(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb * 1024 / 1e6


def _usable(record: SystemRecord | None) -> bool:
    return record is not None and record.status in ("ok", "errors")


def _verdict(value: float | None, limit: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "MISS"


def summarize(
    records: list[SystemRecord],
    params: dict[str, Any],
    host: dict[str, Any],
    micro: MicroResult | None = None,
    micro_failure: str | None = None,
) -> dict[str, Any]:
    by_name = {record.name: record for record in records}
    baseline = by_name.get(BASELINE) if _usable(by_name.get(BASELINE)) else None
    direct = by_name.get("direct") if _usable(by_name.get("direct")) else None
    base_rps = baseline.median("rps") if baseline else None
    base_p99 = baseline.median("p99_ms") if baseline else None
    base_up = baseline.median("mib_s", baseline.upload_runs) if baseline else None
    base_down = baseline.median("mib_s", baseline.download_runs) if baseline else None
    direct_p50 = _us(direct.median("p50_ms", direct.latency_runs)) if direct else None
    direct_mean = _us(direct.median("mean_ms", direct.latency_runs)) if direct else None

    systems: dict[str, Any] = {}
    for record in records:
        rps, p50, p99 = record.median("rps"), record.median("p50_ms"), record.median("p99_ms")
        lat = record.latency_runs
        lat_p50 = _us(record.median("p50_ms", lat))
        lat_mean = _us(record.median("mean_ms", lat))
        up = record.median("mib_s", record.upload_runs)
        down = record.median("mib_s", record.download_runs)
        entry: dict[str, Any] = {
            "status": record.status,
            "reference": record.reference,
            "failure": record.failure,
            "errors": record.errors,
            "median": {"rps": rps, "p50_ms": p50, "p99_ms": p99},
            "runs": [run.to_json() for run in record.runs],
            "latency_c1": {
                "median": {
                    "p50_us": lat_p50,
                    "mean_us": lat_mean,
                    "p99_us": _us(record.median("p99_ms", lat)),
                },
                "runs": [run.to_json() for run in lat],
            },
            "upload": {"median_mib_s": up, "runs": [run.to_json() for run in record.upload_runs]},
            "download": {"median_mib_s": down, "runs": [run.to_json() for run in record.download_runs]},
            "idle_connections": record.idle.to_json() if record.idle else None,
        }
        if not record.reference:
            entry["ratio_to_nginx"] = {"rps": _ratio(rps, base_rps), "p99": _ratio(p99, base_p99)}
            entry["latency_c1"]["added_p50_us"] = _diff(lat_p50, direct_p50)
            entry["latency_c1"]["added_mean_us"] = _diff(lat_mean, direct_mean)
            entry["upload"]["ratio_to_nginx"] = _ratio(up, base_up)
            entry["download"]["ratio_to_nginx"] = _ratio(down, base_down)
        systems[record.name] = entry

    summary: dict[str, Any] = {
        "params": params,
        "host": host,
        "baseline": BASELINE,
        "subject": SUBJECT,
        "skipped": list(params.get("skip", [])),
        "systems": systems,
        "micro": micro.to_json() if micro else ({"failure": micro_failure} if micro_failure else None),
    }
    summary["targets"] = _targets(summary)
    return summary


def _targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    skipped = set(summary["skipped"])
    subject = summary["systems"].get(SUBJECT)
    targets: list[dict[str, Any]] = []

    def add(key: str, what: str, value: float | None, limit: float, unit: str, higher: bool) -> None:
        op = ">=" if higher else "<="
        targets.append(
            {
                "key": key,
                "what": what,
                "target": f"{op} {limit:g}{unit}",
                "value": value,
                "unit": unit,
                "verdict": _verdict(value, limit, higher),
            }
        )

    if subject is not None:
        if "throughput" not in skipped:
            ratio = subject.get("ratio_to_nginx") or {}
            add("rps_ratio", "throughput vs nginx", ratio.get("rps"), TARGET_RPS_RATIO, "x nginx", True)
            add("p99_ratio", "p99 vs nginx", ratio.get("p99"), TARGET_P99_RATIO, "x nginx", False)
        if "latency" not in skipped:
            added = subject["latency_c1"].get("added_p50_us")
            add("added_latency", "added latency at c=1 (p50)", added, TARGET_ADDED_US, " us", False)
        if "transfer" not in skipped:
            for kind in ("upload", "download"):
                value = subject[kind].get("ratio_to_nginx")
                add(f"{kind}_ratio", f"{kind} MiB/s vs nginx", value, TARGET_TRANSFER_RATIO, "x nginx", True)
        if "rss" not in skipped:
            idle = subject.get("idle_connections") or {}
            wanted = summary["params"].get("rss_connections")
            add(
                "rss",
                f"peak RSS at {wanted:,} idle conns",
                _mb(idle.get("peak_kb")),
                TARGET_RSS_MB,
                " MB",
                False,
            )
    micro = summary.get("micro") or {}
    for routing in micro.get("routing", []):
        shape = f"{routing['groups']}x{routing['pods_per_group']}"
        for cache in ("hot", "cold"):
            add(
                f"route_{cache}_{shape}",
                f"routing decision, {cache} cache, {shape}",
                routing[f"{cache}_us"],
                TARGET_ROUTE_US,
                " us",
                False,
            )
    return targets


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


Cell = Callable[[str, dict[str, Any]], str]


def format_table(summary: dict[str, Any]) -> str:
    """One table: a row per figure, a column per system, then the target and shardgate's verdict."""
    params = summary["params"]
    skipped = set(summary["skipped"])
    systems: dict[str, Any] = summary["systems"]
    names = list(systems)
    targets = {target["key"]: target for target in summary["targets"]}
    rows: list[list[str]] = []

    def row(label: str, cell: Cell | None = None, target: str | None = None, spec: str = ".2f") -> None:
        cells = [cell(name, systems[name]) if cell else "" for name in names]
        goal = result = ""
        if target is not None and target in targets:
            found = targets[target]
            unit = "x" if found["unit"].startswith("x") else ""
            goal = found["target"]
            result = f"{_fmt(found['value'], spec, unit)} {found['verdict']}"
        rows.append([label, *cells, goal, result])

    def metric(path: Sequence[str], spec: str, suffix: str = "", proxies_only: bool = False) -> Cell:
        def cell(name: str, entry: dict[str, Any]) -> str:
            if proxies_only and entry["reference"]:
                return ""
            value: Any = entry
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            return _fmt(value, spec, suffix)

        return cell

    def idle_cell(attribute: str, convert: Callable[[Any], float | None], spec: str) -> Cell:
        def cell(name: str, entry: dict[str, Any]) -> str:
            idle = entry.get("idle_connections")
            if entry["reference"]:
                return ""
            return _fmt(convert(idle.get(attribute)) if idle else None, spec)

        return cell

    if "throughput" not in skipped:
        row(
            f"throughput req/s (c={params['connections']}, {params['duration_s']}s)",
            metric(("median", "rps"), ",.0f"),
        )
        row("  p50 ms", metric(("median", "p50_ms"), ".2f"))
        row("  p99 ms", metric(("median", "p99_ms"), ".2f"))
        row("  req/s vs nginx", metric(("ratio_to_nginx", "rps"), ".2f", "x", True), "rps_ratio")
        row("  p99 vs nginx", metric(("ratio_to_nginx", "p99"), ".2f", "x", True), "p99_ratio")
    if "latency" not in skipped:
        row(
            f"latency c=1 p50 us ({params['latency_runs']}x {params['latency_duration_s']}s)",
            metric(("latency_c1", "median", "p50_us"), ".0f"),
        )
        row("  mean us", metric(("latency_c1", "median", "mean_us"), ".0f"))
        row("  p99 us", metric(("latency_c1", "median", "p99_us"), ".0f"))
        row(
            "  added p50 us (minus direct)",
            metric(("latency_c1", "added_p50_us"), ".0f", "", True),
            "added_latency",
            ".0f",
        )
        row("  added mean us (minus direct)", metric(("latency_c1", "added_mean_us"), ".0f", "", True))
    if "transfer" not in skipped:
        conns, secs = params["transfer_connections"], params["transfer_duration_s"]
        row(f"upload MiB/s (1 MiB POST, c={conns}, {secs}s)", metric(("upload", "median_mib_s"), ",.0f"))
        row("  upload vs nginx", metric(("upload", "ratio_to_nginx"), ".2f", "x", True), "upload_ratio")
        row(f"download MiB/s (10 MiB GET, c={conns}, {secs}s)", metric(("download", "median_mib_s"), ",.0f"))
        row("  download vs nginx", metric(("download", "ratio_to_nginx"), ".2f", "x", True), "download_ratio")
    if "rss" not in skipped:

        def identity(value: Any) -> float | None:
            return value

        row(
            f"idle keep-alive conns open (of {params['rss_connections']:,})",
            idle_cell("still_open", identity, ",.0f"),
        )
        row("  RSS before MB", idle_cell("rss_before_kb", _mb, ".1f"))
        row("  RSS with conns open MB", idle_cell("rss_kb", _mb, ".1f"))
        row("  peak RSS MB (VmHWM)", idle_cell("peak_kb", _mb, ".1f"), "rss", ".1f")
        row("  kB per connection", idle_cell("per_connection_kb", identity, ".2f"))
    micro = summary.get("micro") or {}
    if "micro" not in skipped and SUBJECT in systems:

        def subject_only(value: float | None, spec: str) -> Cell:
            return lambda name, entry: _fmt(value, spec) if name == SUBJECT else ""

        for routing in micro.get("routing", []):
            shape = f"{routing['groups']}x{routing['pods_per_group']}"
            for cache in ("hot", "cold"):
                row(
                    f"route us ({cache} key cache, {shape} pods)",
                    subject_only(routing[f"{cache}_us"], ".2f"),
                    f"route_{cache}_{shape}",
                )
        rebuild = micro.get("rebuild")
        if rebuild:
            shape = f"{rebuild['groups']}x{rebuild['pods_per_group']}"
            row(
                f"rebuild ms, pod change ({shape}, ring reused)",
                subject_only(rebuild["pod_change_ms"], ".1f"),
            )
            row(
                f"rebuild ms, weight change ({shape}, new ring)",
                subject_only(rebuild["weight_change_ms"], ".1f"),
            )
    row("errors (failed requests/conns)", lambda name, entry: f"{entry['errors']:,}")
    row("status", lambda name, entry: entry["status"] if entry["status"] == "ok" else entry["status"].upper())

    headers = ["metric", *(f"{n} (ref)" if systems[n]["reference"] else n for n in names), "target", SUBJECT]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]
    right = set(range(1, len(names) + 1))

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()

    host = summary["host"]
    load = host.get("loadavg_at_start")
    transfer_runs = params.get("transfer_runs", params["runs"])
    title = (
        f"shardgate bench {host.get('timestamp', '')}: medians of {params['runs']} run(s) per system"
        f" ({params.get('latency_runs')} for latency, {transfer_runs} for transfers),"
        f" systems alternated, {params['warmup_s']}s warm-up before each run; {host.get('cpus')} cpus"
        + (f", load {load[0]:.2f} at start" if load else "")
    )
    out = [title, line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    out += [
        "throughput/latency: wrk POST /orders, User-ID varied; added = median proxy p50 - median direct p50;"
        " MiB/s of payload;",
        "MB = 10^6 bytes (VmRSS of nginx's worker, HAProxy's and shardgate's only process);"
        " route = router.decide + router.choose_pod per call, in-process",
    ]
    notes = _notes(summary)
    if notes:
        out += ["", "Flagged:", *notes]
    if skipped:
        out.append(f"Skipped: {', '.join(sorted(skipped, key=PHASES.index))}")
    return "\n".join(out)


def _notes(summary: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    for name, entry in summary["systems"].items():
        if entry["failure"]:
            lines = [text.strip() for text in entry["failure"].splitlines() if text.strip()] or ["?"]
            detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            notes.append(f"  {name}: FAILED: {detail}")
        elif entry["errors"]:
            parts = []
            for phase, runs in (
                ("throughput", entry["runs"]),
                ("latency", entry["latency_c1"]["runs"]),
                ("upload", entry["upload"]["runs"]),
                ("download", entry["download"]["runs"]),
            ):
                non2xx = sum(run["non_2xx"] for run in runs)
                socket = sum(sum(run["socket_errors"].values()) for run in runs)
                if non2xx or socket:
                    parts.append(f"{phase}: {non2xx} non-2xx, {socket} socket")
            idle = entry.get("idle_connections")
            if idle and idle["errors"]:
                sample = f" ({idle['error_samples'][0]})" if idle["error_samples"] else ""
                closed = idle["opened"] - idle["still_open"]
                parts.append(f"idle: {idle['failed']} failed, {closed} closed early{sample}")
            notes.append(
                f"  {name}: {entry['errors']} failed requests/connections; not comparable: {'; '.join(parts)}"
            )
    micro = summary.get("micro") or {}
    if micro.get("failure"):
        notes.append(f"  micro-benchmark FAILED: {micro['failure']}")
    for name, entry in summary["systems"].items():
        idle = entry.get("idle_connections")
        if idle and not idle["hwm_reset"]:
            notes.append(
                f"  {name}: could not reset VmHWM; the peak RSS shown is VmRSS with the connections open"
            )
    limited = summary["params"].get("rss_limited_by")
    if limited:
        notes.append(f"  idle connections: {limited}")
    return notes
