"""The report as one table (plain text for stdout, Markdown for bench/results/), with its notes.

A row per figure, a column per system, then the target and one verdict column per gateway build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.configs import TRANSFER_SETTINGS
from bench.headers import SHOWN, joined
from bench.report import PHASES, TARGET_SHAPE, mb
from bench.shapes import LABELS

Cell = Callable[[str, dict[str, Any]], str]
SHOWN_PROBES = ("ingress", "chained")  # of the header check, in the Markdown report
MAX_VALUE_CHARS = 44
PROBE_FIELDS = ("X-Forwarded-For", "Via", "X-Request-ID")  # what the client sent, named above each probe


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int]  # columns of figures (right-aligned)


class _Rows:
    """Collects the rows; a row with a target key gets each subject's verdict."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.systems: dict[str, Any] = summary["systems"]
        self.names = list(self.systems)
        self.subjects: list[str] = summary["subjects"]
        self.targets = {(t["key"], t["system"]): t for t in summary["targets"]}
        self.rows: list[list[str]] = []

    def add(self, label: str, cell: Cell | None = None, key: str | None = None, spec: str = ".2f") -> None:
        cells = [cell(name, self.systems[name]) if cell else "" for name in self.names]
        goal, verdicts = "", []
        for subject in self.subjects:
            found = self.targets.get((key, subject)) if key else None
            if found is None:
                verdicts.append("")
                continue
            goal = found["target"]
            unit = "x" if found["unit"].startswith("x") else ""
            verdicts.append(f"{_fmt(found['value'], spec, unit)} {found['verdict']}")
        self.rows.append([label, *cells, goal, *verdicts])


def _metric(path: Sequence[str], spec: str, suffix: str = "", proxies_only: bool = False) -> Cell:
    def cell(name: str, entry: dict[str, Any]) -> str:
        if proxies_only and entry["reference"]:
            return ""
        value: Any = entry
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return _fmt(value, spec, suffix)

    return cell


def _idle(attribute: str, convert: Callable[[Any], float | None], spec: str) -> Cell:
    def cell(name: str, entry: dict[str, Any]) -> str:
        idle = entry.get("idle_connections")
        if entry["reference"]:
            return ""
        return _fmt(convert(idle.get(attribute)) if idle else None, spec)

    return cell


def _identity(value: Any) -> float | None:
    return value


def _throughput_rows(rows: _Rows, summary: dict[str, Any], shape: str) -> None:
    params = summary["params"]
    judged = shape == TARGET_SHAPE
    rows.add(
        f"throughput req/s, {LABELS[shape]} (c={params['connections']}, {params['duration_s']}s)",
        _metric(("throughput", shape, "median", "rps"), ",.0f"),
    )
    rows.add("  p50 ms", _metric(("throughput", shape, "median", "p50_ms"), ".2f"))
    rows.add("  p99 ms", _metric(("throughput", shape, "median", "p99_ms"), ".2f"))
    rows.add(
        "  req/s vs nginx",
        _metric(("throughput", shape, "ratio_to_nginx", "rps"), ".2f", "x", True),
        "rps_ratio" if judged else None,
    )
    rows.add(
        "  p99 vs nginx",
        _metric(("throughput", shape, "ratio_to_nginx", "p99"), ".2f", "x", True),
        "p99_ratio" if judged else None,
    )


def _latency_rows(rows: _Rows, summary: dict[str, Any], shape: str) -> None:
    params = summary["params"]
    judged = shape == TARGET_SHAPE
    rows.add(
        f"latency c=1 p50 us, {LABELS[shape]} ({params['latency_runs']}x {params['latency_duration_s']}s)",
        _metric(("latency_c1", shape, "median", "p50_us"), ".0f"),
    )
    rows.add("  mean us", _metric(("latency_c1", shape, "median", "mean_us"), ".0f"))
    rows.add("  p99 us", _metric(("latency_c1", shape, "median", "p99_us"), ".0f"))
    rows.add(
        "  added p50 us (minus direct)",
        _metric(("latency_c1", shape, "added_p50_us"), ".0f", "", True),
        "added_latency" if judged else None,
        ".0f",
    )
    rows.add(
        "  added mean us (minus direct)", _metric(("latency_c1", shape, "added_mean_us"), ".0f", "", True)
    )


def _transfer_rows(rows: _Rows, summary: dict[str, Any]) -> None:
    params = summary["params"]
    conns, secs = params["transfer_connections"], params["transfer_duration_s"]
    rows.add(f"upload MiB/s (1 MiB POST, c={conns}, {secs}s)", _metric(("upload", "median_mib_s"), ",.0f"))
    rows.add("  upload vs nginx", _metric(("upload", "ratio_to_nginx"), ".2f", "x", True), "upload_ratio")
    rows.add(
        f"download MiB/s (10 MiB GET, c={conns}, {secs}s)", _metric(("download", "median_mib_s"), ",.0f")
    )
    rows.add(
        "  download vs nginx", _metric(("download", "ratio_to_nginx"), ".2f", "x", True), "download_ratio"
    )


def _idle_rows(rows: _Rows, summary: dict[str, Any]) -> None:
    rows.add(
        f"idle keep-alive conns open (of {summary['params']['rss_connections']:,})",
        _idle("still_open", _identity, ",.0f"),
    )
    rows.add("  RSS before MB", _idle("rss_before_kb", mb, ".1f"))
    rows.add("  RSS with conns open MB", _idle("rss_kb", mb, ".1f"))
    rows.add("  peak RSS MB (VmHWM)", _idle("peak_kb", mb, ".1f"), "rss", ".1f")
    rows.add("  kB per connection", _idle("per_connection_kb", _identity, ".2f"))


def _micro_rows(rows: _Rows, summary: dict[str, Any]) -> None:
    micro = (summary.get("micro") or {}).get("systems") or {}
    present = [entry for entry in micro.values() if "routing" in entry]
    if not present:
        return

    def value_of(pick: Callable[[dict[str, Any]], float | None], spec: str) -> Cell:
        return lambda name, entry: _fmt(pick(micro[name]), spec) if "routing" in micro.get(name, {}) else ""

    for index, routing in enumerate(present[0]["routing"]):
        shape = f"{routing['groups']}x{routing['pods_per_group']}"
        for cache in ("hot", "cold"):
            rows.add(
                f"route us ({cache} key cache, {shape} pods)",
                value_of(lambda doc, i=index, c=cache: doc["routing"][i][f"{c}_us"], ".2f"),
                f"route_{cache}_{shape}",
            )
    rebuild = present[0]["rebuild"]
    shape = f"{rebuild['groups']}x{rebuild['pods_per_group']}"
    rows.add(
        f"rebuild ms, pod change ({shape}, ring reused)",
        value_of(lambda d: d["rebuild"]["pod_change_ms"], ".1f"),
    )
    rows.add(
        f"rebuild ms, weight change ({shape}, new ring)",
        value_of(lambda d: d["rebuild"]["weight_change_ms"], ".1f"),
    )


def _build_cell(summary: dict[str, Any]) -> Cell:
    micro = (summary.get("micro") or {}).get("systems") or {}

    def cell(name: str, entry: dict[str, Any]) -> str:
        build = (entry.get("build") or {}).get("build") or micro.get(name, {}).get("build")
        return str(build) if build else ""

    return cell


def _check_cell(name: str, entry: dict[str, Any]) -> str:
    check = entry.get("header_check")
    if check is None:
        return ""
    return "ok" if not check["problems"] else f"{len(check['problems'])} problems"


def build_table(summary: dict[str, Any]) -> Table:
    skipped = set(summary["skipped"])
    shapes = summary["params"].get("shapes", [TARGET_SHAPE])
    rows = _Rows(summary)
    if summary["subjects"]:
        rows.add("gateway build", _build_cell(summary))
    for phase, add in (("throughput", _throughput_rows), ("latency", _latency_rows)):
        if phase not in skipped:
            for shape in shapes:
                add(rows, summary, shape)
    if "transfer" not in skipped:
        _transfer_rows(rows, summary)
    if "rss" not in skipped:
        _idle_rows(rows, summary)
    if "micro" not in skipped:
        _micro_rows(rows, summary)
    if any(entry.get("header_check") for entry in summary["systems"].values()):
        rows.add("header check (bench/headers.py)", _check_cell)
    rows.add("errors (failed requests/conns)", lambda name, entry: f"{entry['errors']:,}")
    rows.add(
        "status", lambda name, entry: entry["status"] if entry["status"] == "ok" else entry["status"].upper()
    )
    systems = summary["systems"]
    headers = [
        "metric",
        *(f"{name} (ref)" if systems[name]["reference"] else name for name in rows.names),
        "target",
        *(f"{name} verdict" for name in rows.subjects),
    ]
    return Table(headers, rows.rows, set(range(1, len(rows.names) + 1)))


# ---------------------------------------------------------------------------------- notes


def title(summary: dict[str, Any]) -> str:
    params, host = summary["params"], summary["host"]
    load = host.get("loadavg_at_start")
    transfer_runs = params.get("transfer_runs", params["runs"])
    return (
        f"shardgate bench {host.get('timestamp', '')}: medians of {params['runs']} run(s) per system"
        f" ({params.get('latency_runs')} for latency, {transfer_runs} for transfers), systems alternated,"
        f" {params['warmup_s']}s warm-up before each run; {host.get('cpus')} cpus"
        + (f", load {load[0]:.2f} at start" if load else "")
    )


def notes(summary: dict[str, Any]) -> list[str]:
    """What the rows mean (printed under the table)."""
    lines = [
        "requests: Ingress-shaped = as ingress-nginx forwards a client's JSON POST (its default X-Request-ID,"
        " X-Real-IP, X-Forwarded-For/-Host/-Port/-Proto/-Scheme, X-Scheme; the client's User-Agent, Accept,"
        " Content-Type, traceparent, User-ID); bare = Host, Content-Type, User-ID, Content-Length."
        f" Targets judge the {LABELS[TARGET_SHAPE]} rows.",
        "shardgate: Kubernetes config source (ConfigMap + EndpointSlices from the API-server double), one"
        " worker; shardgate-pure: the same with SHARDGATE_PURE_PYTHON=1; nginx and HAProxy do the gateway's"
        " header work (X-Forwarded-*, X-Request-ID both ways, Via, X-Shard-*): bench/README.md.",
        "added = median proxy p50 - median direct p50; MiB/s of payload; MB = 10^6 bytes (VmHWM of nginx's"
        " worker, HAProxy's and shardgate's only process); route = router.decide + router.choose_pod per"
        " call, in a process of that build.",
    ]
    if "transfer" not in summary["skipped"]:
        lines.append(
            "transfer settings: " + "; ".join(f"{name}: {text}" for name, text in TRANSFER_SETTINGS.items())
        )
    return lines


def _failure_note(name: str, failure: str) -> str:
    lines = [text.strip() for text in failure.splitlines() if text.strip()] or ["?"]
    detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"  {name}: FAILED: {detail}"


def _error_note(name: str, entry: dict[str, Any]) -> str:
    parts = []
    phases: list[tuple[str, list[dict[str, Any]]]] = [
        *((f"throughput {shape}", doc["runs"]) for shape, doc in entry["throughput"].items()),
        *((f"latency {shape}", doc["runs"]) for shape, doc in entry["latency_c1"].items()),
        ("upload", entry["upload"]["runs"]),
        ("download", entry["download"]["runs"]),
    ]
    for phase, runs in phases:
        non2xx = sum(run["non_2xx"] for run in runs)
        socket = sum(sum(run["socket_errors"].values()) for run in runs)
        if non2xx or socket:
            parts.append(f"{phase}: {non2xx} non-2xx, {socket} socket")
    idle = entry.get("idle_connections")
    if idle and idle["errors"]:
        sample = f" ({idle['error_samples'][0]})" if idle["error_samples"] else ""
        closed = idle["opened"] - idle["still_open"]
        parts.append(f"idle: {idle['failed']} failed, {closed} closed early{sample}")
    return f"  {name}: {entry['errors']} failed requests/connections; not comparable: {'; '.join(parts)}"


def _build_notes(name: str, entry: dict[str, Any]) -> list[str]:
    build = entry.get("build")
    if not build:
        return []
    found = []
    if name == "shardgate" and build["build"] == "pure":
        found.append(
            "  shardgate: ran the pure-Python build (no compiled data-plane modules are installed);"
            " its targets are the compiled build's"
        )
    if build.get("error"):
        found.append(f"  {name}: build probe: {build['error']}")
    if build.get("mismatch"):
        found.append(f"  {name}: build: {build['mismatch']}")
    return found


def flagged(summary: dict[str, Any]) -> list[str]:
    """Everything that makes a figure suspect or not comparable."""
    found: list[str] = []
    for name, entry in summary["systems"].items():
        if entry["failure"]:
            found.append(_failure_note(name, entry["failure"]))
        elif entry["errors"]:
            found.append(_error_note(name, entry))
        found += _build_notes(name, entry)
        check = entry.get("header_check")
        for problem in (check or {}).get("problems", []):
            found.append(f"  {name}: header check: {problem}")
        idle = entry.get("idle_connections")
        if idle and not idle["hwm_reset"]:
            found.append(
                f"  {name}: could not reset VmHWM; the peak RSS shown is VmRSS with the connections open"
            )
    for name, entry in ((summary.get("micro") or {}).get("systems") or {}).items():
        if "failure" in entry:
            found.append(f"  {name}: micro-benchmark FAILED: {entry['failure']}")
    limited = summary["params"].get("rss_limited_by")
    if limited:
        found.append(f"  idle connections: {limited}")
    return found


def _skipped(summary: dict[str, Any]) -> str | None:
    skipped = summary["skipped"]
    return f"Skipped: {', '.join(sorted(skipped, key=PHASES.index))}" if skipped else None


# ---------------------------------------------------------------------------------- text


def format_table(summary: dict[str, Any]) -> str:
    """The stdout report: title, table, notes, flagged, skipped."""
    table = build_table(summary)
    widths = [max(len(table.headers[i]), *(len(r[i]) for r in table.rows)) for i in range(len(table.headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in table.numeric else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    out = [title(summary), line(table.headers), line(["-" * w for w in widths]), *map(line, table.rows)]
    out += notes(summary)
    problems = flagged(summary)
    if problems:
        out += ["", "Flagged:", *problems]
    skipped = _skipped(summary)
    if skipped:
        out.append(skipped)
    return "\n".join(out)


# ---------------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    indent = len(text) - len(text.lstrip(" "))  # sub-rows ("  p99 ms") keep their indentation
    return "&nbsp;" * indent + text.strip().replace("|", "\\|") or " "


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    align = ["---:" if i in numeric else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _machine_rows(host: dict[str, Any]) -> list[list[str]]:
    cores = f"{host.get('cpus')} logical"
    if host.get("physical_cores"):
        cores += f", {host['physical_cores']} physical"
    if host.get("virtualized"):
        cores += " (virtual machine)"
    load = host.get("loadavg_at_start")
    return [
        ["CPU", str(host.get("cpu_model") or "?")],
        ["cores", cores],
        ["memory", f"{host.get('memory_gib')} GiB"],
        ["kernel", f"{host.get('kernel')} ({host.get('machine')})"],
        ["distribution", str(host.get("distro") or "?")],
        ["Python", str(host.get("python"))],
        ["nginx", str(host.get("nginx") or "-")],
        ["HAProxy", str(host.get("haproxy") or "-")],
        ["wrk", str(host.get("wrk") or "-")],
        ["load average at start (1, 5, 15 min)", ", ".join(f"{v:.2f}" for v in load) if load else "?"],
        ["date (UTC)", str(host.get("timestamp"))],
        ["commit", str(host.get("commit") or "?")],
    ]


def _short(value: str | None) -> str:
    if value is None:
        return "-"
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 3] + "..."


def _header_section(summary: dict[str, Any]) -> list[str]:
    checked = {
        name: entry["header_check"] for name, entry in summary["systems"].items() if entry.get("header_check")
    }
    if not checked:
        return []
    lines = [
        "## Header check",
        "",
        "What the backend received and what the client got back, per proxy (bench/headers.py; a field sent as"
        " several lines is shown comma-joined).",
    ]
    for probe_name in SHOWN_PROBES:
        rows = []
        for where, field_name in SHOWN:
            cells = [f"{where}: {field_name}"]
            for check in checked.values():
                probe = next((p for p in check["probes"] if p["name"] == probe_name), None)
                fields = probe[where] if probe else []
                cells.append(_short(joined(fields, field_name)))
            rows.append(cells)
        sent = next(p for p in next(iter(checked.values()))["probes"] if p["name"] == probe_name)["sent"]
        client = {name.lower(): value for name, value in sent}
        sent_fields = ", ".join(f"{name} {client.get(name.lower())!r}" for name in PROBE_FIELDS)
        lines += ["", f"Probe `{probe_name}` (the client sent {sent_fields}):", ""]
        lines += _md_table(["field", *checked], rows, set())
    return lines


def format_markdown(summary: dict[str, Any], name: str | None = None) -> str:
    """The recorded report: machine, table, notes, header check, flagged."""
    table = build_table(summary)
    params = summary["params"]
    lines = [
        f"# shardgate benchmark{': ' + name if name else ''}",
        "",
        title(summary) + ".",
        "",
        f"Command: `{' '.join(['python -m bench.run', *params.get('argv', [])])}`",
        "",
        "## Machine",
        "",
        *_md_table(["", ""], _machine_rows(summary["host"]), set()),
        "",
        "## Results",
        "",
        *_md_table(table.headers, table.rows, table.numeric),
        "",
        *(f"- {note}" for note in notes(summary)),
    ]
    header = _header_section(summary)
    if header:
        lines += ["", *header]
    problems = flagged(summary)
    if problems:
        lines += ["", "## Flagged", "", *(f"- {problem.strip()}" for problem in problems)]
    skipped = _skipped(summary)
    if skipped:
        lines += ["", skipped]
    return "\n".join(lines) + "\n"
