"""Aggregating runs into medians, ratios and target verdicts: the JSON document; bench/tables.py prints it."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.build import BuildInfo
from bench.headers import HeaderCheck
from bench.idle import IdleResult
from bench.shapes import SHAPES
from bench.systems import SHARDGATE_SYSTEMS
from bench.wrk import WrkResult

BASELINE = "nginx"
SUBJECTS = SHARDGATE_SYSTEMS  # the systems the targets are about: both builds of the gateway
TARGET_SHAPE = "ingress"  # the targets judge the Ingress-shaped rows; the bare rows are for reference

PHASES = ("throughput", "latency", "transfer", "rss", "micro")


@dataclass(frozen=True)
class Goal:
    """One of issue 13's targets; the verdict is printed, never turned into an exit status."""

    key: str
    what: str
    limits: dict[str, float]  # subject -> limit
    unit: str
    higher_is_better: bool

    def limit(self, subject: str) -> float:
        return self.limits.get(subject, self.limits[SUBJECTS[0]])

    @property
    def text(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        first = self.limits[SUBJECTS[0]]
        others = [
            f"{name} {op} {value:g}{self.unit}" for name, value in self.limits.items() if value != first
        ]
        return f"{op} {first:g}{self.unit}" + (f" ({', '.join(others)})" if others else "")


def _both(limit: float) -> dict[str, float]:
    return dict.fromkeys(SUBJECTS, limit)


GOALS = {
    # Ingress-shaped POSTs at c=64, one worker each: the compiled build at least matches nginx.
    "rps_ratio": Goal(
        "rps_ratio", "throughput vs nginx", {"shardgate": 1.0, "shardgate-pure": 0.75}, "x nginx", True
    ),
    "p99_ratio": Goal("p99_ratio", "p99 vs nginx", _both(1.2), "x nginx", False),
    "added_latency": Goal("added_latency", "added latency at c=1 (p50)", _both(50.0), " us", False),
    "upload_ratio": Goal("upload_ratio", "upload MiB/s vs nginx", _both(0.5), "x nginx", True),
    "download_ratio": Goal("download_ratio", "download MiB/s vs nginx", _both(0.5), "x nginx", True),
    "rss": Goal("rss", "peak RSS at idle conns, Kubernetes source", _both(100.0), " MB", False),
    "route": Goal("route", "routing decision", _both(2.0), " us", False),
}


@dataclass
class SystemRecord:
    name: str
    reference: bool = False
    build: BuildInfo | None = None  # shardgate systems: the gateway build it ran
    config_source: dict[str, Any] | None = None  # shardgate systems: source, watches, epoch, pods
    throughput: dict[str, list[WrkResult]] = field(default_factory=dict)  # shape -> wrk -c64 runs
    latency: dict[str, list[WrkResult]] = field(default_factory=dict)  # shape -> concurrency-1 runs
    upload_runs: list[WrkResult] = field(default_factory=list)
    download_runs: list[WrkResult] = field(default_factory=list)
    idle: IdleResult | None = None
    headers: HeaderCheck | None = None
    failure: str | None = None  # why the system could not start or stopped taking part

    @property
    def wrk_runs(self) -> list[WrkResult]:
        runs = [run for store in (self.throughput, self.latency) for shape in store.values() for run in shape]
        return [*runs, *self.upload_runs, *self.download_runs]

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


def median(runs: Sequence[WrkResult], attribute: str) -> float | None:
    present = [value for value in (getattr(run, attribute) for run in runs) if value is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _diff(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3


def mb(kb: int | None) -> float | None:
    return None if kb is None else kb * 1024 / 1e6


def _usable(record: SystemRecord | None) -> SystemRecord | None:
    return record if record is not None and record.status in ("ok", "errors") else None


def _verdict(value: float | None, limit: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "MISS"


@dataclass
class _References:
    """The baseline's and the direct row's medians the ratios and the added latency are taken against."""

    rps: dict[str, float | None]
    p99: dict[str, float | None]
    direct_p50_us: dict[str, float | None]
    direct_mean_us: dict[str, float | None]
    upload: float | None
    download: float | None

    @classmethod
    def of(cls, baseline: SystemRecord | None, direct: SystemRecord | None) -> _References:
        def per_shape(record: SystemRecord | None, store: str, attribute: str) -> dict[str, float | None]:
            runs: dict[str, list[WrkResult]] = getattr(record, store) if record else {}
            return {shape: median(runs.get(shape, []), attribute) for shape in SHAPES}

        return cls(
            rps=per_shape(baseline, "throughput", "rps"),
            p99=per_shape(baseline, "throughput", "p99_ms"),
            direct_p50_us={k: _us(v) for k, v in per_shape(direct, "latency", "p50_ms").items()},
            direct_mean_us={k: _us(v) for k, v in per_shape(direct, "latency", "mean_ms").items()},
            upload=median(baseline.upload_runs, "mib_s") if baseline else None,
            download=median(baseline.download_runs, "mib_s") if baseline else None,
        )


def _throughput_entry(record: SystemRecord, runs: list[WrkResult], shape: str, refs: _References) -> dict:
    rps, p99 = median(runs, "rps"), median(runs, "p99_ms")
    entry: dict[str, Any] = {
        "median": {"rps": rps, "p50_ms": median(runs, "p50_ms"), "p99_ms": p99},
        "runs": [run.to_json() for run in runs],
    }
    if not record.reference:
        entry["ratio_to_nginx"] = {"rps": _ratio(rps, refs.rps[shape]), "p99": _ratio(p99, refs.p99[shape])}
    return entry


def _latency_entry(record: SystemRecord, runs: list[WrkResult], shape: str, refs: _References) -> dict:
    p50, mean = _us(median(runs, "p50_ms")), _us(median(runs, "mean_ms"))
    entry: dict[str, Any] = {
        "median": {"p50_us": p50, "mean_us": mean, "p99_us": _us(median(runs, "p99_ms"))},
        "runs": [run.to_json() for run in runs],
    }
    if not record.reference:
        entry["added_p50_us"] = _diff(p50, refs.direct_p50_us[shape])
        entry["added_mean_us"] = _diff(mean, refs.direct_mean_us[shape])
    return entry


def _transfer_entry(record: SystemRecord, runs: list[WrkResult], base: float | None) -> dict:
    value = median(runs, "mib_s")
    entry: dict[str, Any] = {"median_mib_s": value, "runs": [run.to_json() for run in runs]}
    if not record.reference:
        entry["ratio_to_nginx"] = _ratio(value, base)
    return entry


def system_entry(record: SystemRecord, refs: _References) -> dict[str, Any]:
    return {
        "status": record.status,
        "reference": record.reference,
        "failure": record.failure,
        "errors": record.errors,
        "build": record.build.to_json() if record.build else None,
        "config_source": record.config_source,
        "throughput": {
            shape: _throughput_entry(record, runs, shape, refs) for shape, runs in record.throughput.items()
        },
        "latency_c1": {
            shape: _latency_entry(record, runs, shape, refs) for shape, runs in record.latency.items()
        },
        "upload": _transfer_entry(record, record.upload_runs, refs.upload),
        "download": _transfer_entry(record, record.download_runs, refs.download),
        "idle_connections": record.idle.to_json() if record.idle else None,
        "header_check": record.headers.to_json() if record.headers else None,
    }


def summarize(
    records: list[SystemRecord],
    params: dict[str, Any],
    host: dict[str, Any],
    micro: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: parameters, machine, every system's figures, micro-benchmarks, targets.

    ``micro`` is {"calls", "repeats", "systems": {name: bench.micro JSON + "build" | {"failure"}}}.
    """
    by_name = {record.name: record for record in records}
    refs = _References.of(_usable(by_name.get(BASELINE)), _usable(by_name.get("direct")))
    summary: dict[str, Any] = {
        "params": params,
        "host": host,
        "baseline": BASELINE,
        "subjects": [name for name in SUBJECTS if name in by_name],
        "target_shape": TARGET_SHAPE,
        "skipped": list(params.get("skip", [])),
        "systems": {record.name: system_entry(record, refs) for record in records},
        "micro": micro,
    }
    summary["targets"] = _targets(summary)
    return summary


def micro_failed(micro: dict[str, Any] | None) -> bool:
    return any("failure" in entry for entry in ((micro or {}).get("systems") or {}).values())


# ---------------------------------------------------------------------------------- targets


def _subject_values(summary: dict[str, Any], subject: str) -> dict[str, float | None]:
    """The figures of ``subject`` that the targets judge, by target key (absent: not measured)."""
    skipped = set(summary["skipped"])
    entry = summary["systems"].get(subject)
    values: dict[str, float | None] = {}
    if entry is not None:
        shape = TARGET_SHAPE
        if "throughput" not in skipped and shape in entry["throughput"]:
            ratio = entry["throughput"][shape].get("ratio_to_nginx") or {}
            values["rps_ratio"], values["p99_ratio"] = ratio.get("rps"), ratio.get("p99")
        if "latency" not in skipped and shape in entry["latency_c1"]:
            values["added_latency"] = entry["latency_c1"][shape].get("added_p50_us")
        if "transfer" not in skipped:
            values["upload_ratio"] = entry["upload"].get("ratio_to_nginx")
            values["download_ratio"] = entry["download"].get("ratio_to_nginx")
        if "rss" not in skipped:
            values["rss"] = mb((entry.get("idle_connections") or {}).get("peak_kb"))
    micro = ((summary.get("micro") or {}).get("systems") or {}).get(subject) or {}
    for routing in micro.get("routing", []):
        shape_name = f"{routing['groups']}x{routing['pods_per_group']}"
        for cache in ("hot", "cold"):
            values[f"route_{cache}_{shape_name}"] = routing[f"{cache}_us"]
    return values


def _goal_of(key: str) -> Goal:
    return GOALS["route"] if key.startswith("route_") else GOALS[key]


def _targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for subject in summary["subjects"]:
        build = (summary["systems"].get(subject) or {}).get("build") or {}
        micro_build = (((summary.get("micro") or {}).get("systems") or {}).get(subject) or {}).get("build")
        for key, value in _subject_values(summary, subject).items():
            goal = _goal_of(key)
            limit = goal.limit(subject)
            what = goal.what
            if key.startswith("route_"):
                _, cache, shape = key.split("_")
                what = f"{goal.what}, {cache} cache, {shape}"
            targets.append(
                {
                    "key": key,
                    "system": subject,
                    "build": micro_build if key.startswith("route_") else build.get("build"),
                    "what": what,
                    "target": goal.text,
                    "limit": limit,
                    "value": value,
                    "unit": goal.unit,
                    "verdict": _verdict(value, limit, goal.higher_is_better),
                }
            )
    return targets


def write_json(summary: dict[str, Any], path: Path) -> None:
    write_text(json.dumps(summary, indent=2) + "\n", path)


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
