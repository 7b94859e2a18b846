"""Benchmark shardgate against nginx and HAProxy in front of the same backends, in one sitting.

    python -m bench.run [--runs 3] [--duration 10] [--warmup 2] [--systems shardgate,nginx,haproxy]

Runs alternate between the systems (A, B, C, A, B, C, ...) so that machine drift hits all of them
alike; each measured run is preceded by a short unmeasured warm-up against the same system. A
"direct" row (wrk straight at one backend) is the reference ceiling. The medians, ratios to nginx
and every run's figures go to stdout (a table) and to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.procs import StartupError, Supervisor, free_ports
from bench.report import SystemRecord, format_table, summarize, write_json
from bench.systems import (
    DIRECT,
    GROUPS,
    PODS_PER_GROUP,
    PROXY_SYSTEMS,
    REPO_ROOT,
    Target,
    start_backends,
    start_haproxy,
    start_nginx_proxy,
    start_shardgate,
)
from bench.tools import ToolError, ensure_tools, version
from bench.wrk import WrkError, WrkResult, run_wrk

DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "latest.json"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def _systems(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    allowed = (*PROXY_SYSTEMS, DIRECT)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=_positive_int, default=3, help="measured runs per system (default 3)")
    parser.add_argument("--duration", type=_positive_int, default=10, help="seconds per measured run")
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="unmeasured seconds before each run"
    )
    parser.add_argument(
        "--systems",
        type=_systems,
        default=list(PROXY_SYSTEMS),
        help="comma-separated, in rotation order (default shardgate,nginx,haproxy)",
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the direct-to-backend reference row")
    parser.add_argument("--connections", type=_positive_int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install missing tools")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument(
        "--startup-timeout", type=float, default=30.0, help="seconds for a system to become ready"
    )
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _host_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(load) if load else None,
        "python": platform.python_version(),
        "nginx": version("nginx"),
        "haproxy": version("haproxy"),
        "wrk": version("wrk"),
    }


def _start_systems(
    names: Sequence[str],
    sup: Supervisor,
    workdir: Path,
    backend_ports: Sequence[int],
    records: dict[str, SystemRecord],
    timeout: float,
) -> dict[str, Target]:
    listen_ports = free_ports(len(names) + 1)
    admin_port = listen_ports.pop()
    starters: dict[str, Callable[[int], Target]] = {
        "nginx": lambda port: start_nginx_proxy(sup, workdir, port, backend_ports, timeout),
        "haproxy": lambda port: start_haproxy(sup, workdir, port, backend_ports, timeout),
        "shardgate": lambda port: start_shardgate(sup, workdir, port, admin_port, backend_ports, timeout),
    }
    targets: dict[str, Target] = {}
    for name, port in zip(names, listen_ports, strict=True):
        _log(f"starting {name} on 127.0.0.1:{port}")
        try:
            targets[name] = starters[name](port)
        except (StartupError, RuntimeError, OSError) as exc:
            records[name].failure = f"did not start: {exc}"
            _log(f"{name} FAILED to start: {exc}")
    return targets


def _measure(target: Target, args: argparse.Namespace) -> WrkResult:
    if args.warmup:
        run_wrk(target.url, duration=args.warmup, connections=args.connections, threads=args.threads)
    return run_wrk(target.url, duration=args.duration, connections=args.connections, threads=args.threads)


def run_bench(args: argparse.Namespace, workdir: Path, sup: Supervisor) -> list[SystemRecord]:
    proxies = [name for name in args.systems if name != DIRECT]
    with_direct = DIRECT in args.systems or not args.no_direct
    records = {name: SystemRecord(name) for name in proxies}
    if with_direct:
        records[DIRECT] = SystemRecord(DIRECT, reference=True)

    backend_ports = free_ports(GROUPS * PODS_PER_GROUP)
    _log(f"starting backends on 127.0.0.1:{','.join(map(str, backend_ports))} (temp dir {workdir})")
    backends = start_backends(sup, workdir, backend_ports)
    targets = _start_systems(proxies, sup, workdir, backend_ports, records, args.startup_timeout)
    if with_direct:
        targets[DIRECT] = Target(DIRECT, backend_ports[0], None, reference=True)

    for round_no in range(1, args.runs + 1):
        for name, record in records.items():
            if record.failure is not None or name not in targets:
                continue
            target = targets[name]
            try:
                result = _measure(target, args)
            except (WrkError, subprocess.TimeoutExpired, OSError) as exc:
                record.failure = f"run {round_no}: {exc}"
                _log(f"{name} run {round_no} FAILED: {exc}")
                continue
            record.runs.append(result)
            _log(
                f"round {round_no}/{args.runs} {name:9s} {result.rps:10,.0f} req/s"
                f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}"
            )
            if target.process is not None and not target.process.alive():
                record.failure = (
                    f"exited with status {target.process.proc.returncode} during run {round_no};"
                    f" last log lines:\n{target.process.log_tail()}"
                )
                _log(f"{name} {record.failure}")
            if not backends.alive():
                raise StartupError(f"the backends exited during the benchmark:\n{backends.log_tail()}")
    return list(records.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    needed = {"wrk", "nginx"} | ({"haproxy"} if "haproxy" in args.systems else set())
    try:
        ensure_tools(needed, install=not args.no_install)
    except ToolError as exc:
        _log(str(exc))
        return 2

    host = _host_info()
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="shardgate-bench-"))
    sup = Supervisor(workdir)
    try:
        records = run_bench(args, workdir, sup)
    except KeyboardInterrupt:
        _log("interrupted; stopping everything")
        return 130
    except (StartupError, ToolError, RuntimeError, OSError) as exc:
        _log(f"benchmark aborted: {exc}")
        return 2
    finally:
        sup.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.keep_temp:
            _log(f"kept temp dir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    params = {
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "threads": args.threads,
        "systems": [record.name for record in records],
        "backends": f"nginx return 200, {GROUPS} groups x {PODS_PER_GROUP} pods, 1 worker",
    }
    summary = summarize(records, params, host)
    print(format_table(summary), flush=True)
    write_json(summary, args.output)
    _log(f"wrote {args.output}")
    return 0 if all(record.status == "ok" for record in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
