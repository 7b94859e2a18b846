"""Benchmark shardgate against nginx and HAProxy in front of the same backends, in one sitting.

    python -m bench.run [--runs 5] [--duration 10] [--warmup 2] [--systems shardgate,nginx,haproxy]
                        [--skip throughput,latency,transfer,rss,micro]

One run measures, in this order: the in-process micro-benchmarks (routing decision, topology
rebuild), throughput (wrk -c64), latency at concurrency 1 (proxy and direct, hence the latency a
proxy adds), upload and download rates (1 MiB POSTs, 10 MiB GETs), and the memory of each proxy
holding 10,000 idle keep-alive client connections. Within each measurement the runs alternate
between the systems (A, B, C, A, B, C, ...) so that machine drift hits all of them alike; each
measured wrk run is preceded by a short unmeasured warm-up against the same system. A "direct" row
(wrk straight at one backend) is the reference ceiling. The medians, ratios to nginx, target
verdicts and every run's figures go to stdout (one table) and to bench/results/latest.json.
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

from bench.idle import measure_idle
from bench.micro import MicroResult, run_micro
from bench.procs import Managed, StartupError, Supervisor, free_ports, raise_nofile_limit
from bench.report import PHASES, SystemRecord, format_table, summarize, write_json
from bench.systems import (
    DIRECT,
    DOWNLOAD_BYTES,
    DOWNLOAD_PATH,
    GROUPS,
    HOST,
    PODS_PER_GROUP,
    PROBE_PATH,
    PROXY_SYSTEMS,
    REPO_ROOT,
    UPLOAD_BYTES,
    UPLOAD_PATH,
    Target,
    serving_pids,
    start_backends,
    start_haproxy,
    start_nginx_proxy,
    start_shardgate,
)
from bench.tools import ToolError, ensure_tools, version
from bench.wrk import TRANSFER_SCRIPT, WrkError, WrkResult, run_wrk

DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "latest.json"
MIB = 1024 * 1024
TRANSFER_TIMEOUT_S = 10  # wrk per-request timeout for 1 MiB / 10 MiB requests
FD_HEADROOM = 512  # file descriptors the harness keeps for itself beside the idle connections


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


def _phases(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PHASES)} (got {text!r})")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=_positive_int,
        default=5,
        help="measured throughput runs per system (default 5: the figure the targets judge is their median)",
    )
    parser.add_argument(
        "--duration", type=_positive_int, default=10, help="seconds per throughput run (default 10)"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="unmeasured seconds before each wrk run"
    )
    parser.add_argument(
        "--systems",
        type=_systems,
        default=list(PROXY_SYSTEMS),
        help="comma-separated, in rotation order (default shardgate,nginx,haproxy)",
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the direct-to-backend reference row")
    parser.add_argument(
        "--skip",
        type=_phases,
        default=[],
        help=f"comma-separated measurements to leave out: {','.join(PHASES)}",
    )
    parser.add_argument("--connections", type=_positive_int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="wrk -t (default 1)")
    parser.add_argument(
        "--latency-duration", type=_positive_int, default=2, help="seconds per concurrency-1 run (default 2)"
    )
    parser.add_argument(
        "--latency-runs",
        type=_positive_int,
        default=None,
        help="concurrency-1 runs per system (default 2 x min(--runs, 3) + 1: short runs, many alternations)",
    )
    parser.add_argument(
        "--transfer-runs",
        type=_positive_int,
        default=None,
        help="upload and download runs per system (default min(--runs, 3))",
    )
    parser.add_argument(
        "--transfer-duration",
        type=_positive_int,
        default=5,
        help="seconds per upload/download run (default 5)",
    )
    parser.add_argument(
        "--transfer-connections", type=_positive_int, default=4, help="wrk -c for transfers (default 4)"
    )
    parser.add_argument(
        "--rss-connections",
        type=_positive_int,
        default=10_000,
        help="idle keep-alive connections for the memory measurement (default 10000)",
    )
    parser.add_argument(
        "--micro-calls", type=_positive_int, default=200_000, help="routing calls per repeat (default 200000)"
    )
    parser.add_argument(
        "--micro-repeats", type=_positive_int, default=5, help="micro-benchmark repeats (default 5)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install missing tools")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument(
        "--startup-timeout", type=float, default=30.0, help="seconds for a system to become ready"
    )
    args = parser.parse_args(argv)
    if args.latency_runs is None:
        args.latency_runs = 2 * min(args.runs, 3) + 1
    if args.transfer_runs is None:
        args.transfer_runs = min(args.runs, 3)
    return args


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
    args: argparse.Namespace,
) -> dict[str, Target]:
    listen_ports = free_ports(len(names) + 1)
    admin_port = listen_ports.pop()
    timeout, clients = args.startup_timeout, args.rss_connections
    starters: dict[str, Callable[[int], Target]] = {
        "nginx": lambda port: start_nginx_proxy(sup, workdir, port, backend_ports, timeout, clients),
        "haproxy": lambda port: start_haproxy(sup, workdir, port, backend_ports, timeout, clients),
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


class Bench:
    """The systems of one sitting and the measurements over them."""

    def __init__(
        self,
        args: argparse.Namespace,
        records: dict[str, SystemRecord],
        targets: dict[str, Target],
        backends: Managed,
    ) -> None:
        self.args = args
        self.records = records
        self.targets = targets
        self.backends = backends

    def _active(self, *, proxies_only: bool = False) -> list[tuple[SystemRecord, Target]]:
        return [
            (record, self.targets[name])
            for name, record in self.records.items()
            if record.failure is None and name in self.targets and not (proxies_only and record.reference)
        ]

    def _checked(self, record: SystemRecord, target: Target, label: str) -> None:
        """After a measurement: note a system that exited; abort if the shared backends died."""
        if target.process is not None and not target.process.alive():
            record.failure = (
                f"exited with status {target.process.proc.returncode} during {label};"
                f" last log lines:\n{target.process.log_tail()}"
            )
            _log(f"{record.name} {record.failure}")
        if not self.backends.alive():
            raise StartupError(f"the backends exited during the benchmark:\n{self.backends.log_tail()}")

    def _rotate(
        self,
        phase: str,
        measure: Callable[[Target], WrkResult],
        store: Callable[[SystemRecord], list[WrkResult]],
        describe: Callable[[WrkResult], str],
        rounds: int | None = None,
    ) -> None:
        args = self.args
        rounds = args.runs if rounds is None else rounds
        for round_no in range(1, rounds + 1):
            for record, target in self._active():
                label = f"{phase} run {round_no}"
                try:
                    result = measure(target)
                except (WrkError, subprocess.TimeoutExpired, OSError) as exc:
                    record.failure = f"{label}: {exc}"
                    _log(f"{record.name} {label} FAILED: {exc}")
                    continue
                store(record).append(result)
                progress = f"{phase} {round_no}/{rounds} {record.name:9s}"
                _log(f"{progress} {describe(result)}  errors {result.errors}")
                self._checked(record, target, label)

    def throughput(self) -> None:
        args = self.args

        def measure(target: Target) -> WrkResult:
            options = {"connections": args.connections, "threads": args.threads}
            if args.warmup:
                run_wrk(target.url, duration=args.warmup, **options)
            return run_wrk(target.url, duration=args.duration, **options)

        self._rotate(
            "throughput",
            measure,
            lambda record: record.runs,
            lambda r: f"{r.rps:10,.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms",
        )

    def latency(self) -> None:
        args = self.args

        def measure(target: Target) -> WrkResult:
            if args.warmup:
                run_wrk(target.url, duration=args.warmup, connections=1, threads=1)
            return run_wrk(target.url, duration=args.latency_duration, connections=1, threads=1)

        self._rotate(
            "latency",
            measure,
            lambda record: record.latency_runs,
            lambda r: f"p50 {r.p50_ms * 1e3:7.0f} us  mean {(r.mean_ms or 0) * 1e3:7.0f} us",
            rounds=args.latency_runs,
        )

    def transfer(self) -> None:
        args = self.args
        kinds = {
            "upload": ("POST", UPLOAD_PATH, UPLOAD_BYTES),
            "download": ("GET", DOWNLOAD_PATH, DOWNLOAD_BYTES),
        }
        for kind, (method, path, size) in kinds.items():

            def measure(
                target: Target, method: str = method, path: str = path, size: int = size
            ) -> WrkResult:
                body = size if method == "POST" else 0
                options: dict[str, Any] = {
                    "connections": args.transfer_connections,
                    "threads": 1,
                    "timeout_s": TRANSFER_TIMEOUT_S,
                    "script": TRANSFER_SCRIPT,
                    "script_args": (method, path, str(body)),
                }
                url = target.url_for(path)
                if args.warmup:
                    run_wrk(url, duration=args.warmup, **options)
                result = run_wrk(url, duration=args.transfer_duration, **options)
                if method == "GET" and result.read_bytes is not None:
                    moved = result.read_bytes  # partial responses count too
                else:
                    moved = result.requests * size  # wrk does not count bytes written
                result.mib_s = moved / MIB / result.duration_s if result.duration_s else None
                return result

            self._rotate(
                kind,
                measure,
                lambda record, kind=kind: record.upload_runs if kind == "upload" else record.download_runs,
                lambda r: f"{r.mib_s or 0:8,.0f} MiB/s  ({r.requests} requests)",
                rounds=args.transfer_runs,
            )

    def idle_connections(self) -> None:
        count = self.args.rss_connections
        for record, target in self._active(proxies_only=True):
            pids = serving_pids(target)
            if not pids:
                record.failure = "idle connections: cannot find the serving process"
                continue
            _log(f"idle: opening {count:,} keep-alive connections to {record.name} (pids {pids})")
            try:
                result = measure_idle((HOST, target.port), pids, count, PROBE_PATH)
            except OSError as exc:
                record.failure = f"idle connections: {exc}"
                _log(f"{record.name} idle connections FAILED: {exc}")
                continue
            record.idle = result
            rss = f"{result.rss_kb / 1024:.1f} MiB" if result.rss_kb is not None else "?"
            _log(
                f"idle {record.name:9s} {result.still_open:,}/{count:,} open in {result.open_s:.1f}s,"
                f" RSS {rss}, failed {result.failed}"
            )
            self._checked(record, target, "the idle-connections measurement")


def run_bench(args: argparse.Namespace, workdir: Path, sup: Supervisor) -> list[SystemRecord]:
    proxies = [name for name in args.systems if name != DIRECT]
    wrk_phases = [phase for phase in ("throughput", "latency", "transfer", "rss") if phase not in args.skip]
    # The direct row is the reference of the wrk measurements; the memory one has no use for it.
    with_direct = (DIRECT in args.systems or not args.no_direct) and bool(set(wrk_phases) - {"rss"})
    records = {name: SystemRecord(name) for name in proxies}
    if with_direct:
        records[DIRECT] = SystemRecord(DIRECT, reference=True)
    if not wrk_phases:
        return list(records.values())

    backend_ports = free_ports(GROUPS * PODS_PER_GROUP)
    _log(f"starting backends on 127.0.0.1:{','.join(map(str, backend_ports))} (temp dir {workdir})")
    backends = start_backends(sup, workdir, backend_ports)
    targets = _start_systems(proxies, sup, workdir, backend_ports, records, args)
    if with_direct:
        targets[DIRECT] = Target(DIRECT, backend_ports[0], None, reference=True)

    bench = Bench(args, records, targets, backends)
    steps: dict[str, Callable[[], None]] = {
        "throughput": bench.throughput,
        "latency": bench.latency,
        "transfer": bench.transfer,
        "rss": bench.idle_connections,
    }
    for phase in wrk_phases:
        steps[phase]()
    return list(records.values())


def _micro(args: argparse.Namespace) -> tuple[MicroResult | None, str | None]:
    if "micro" in args.skip:
        return None, None
    _log(f"micro-benchmarks: {args.micro_repeats} x {args.micro_calls:,} routing calls, topology rebuilds")
    try:
        result = run_micro(args.micro_calls, args.micro_repeats)
    except Exception as exc:  # a gateway bug must not cost the rest of the benchmark
        _log(f"micro-benchmarks FAILED: {exc!r}")
        return None, repr(exc)
    for routing in result.routing:
        _log(
            f"micro {routing.groups}x{routing.pods_per_group}: route hot {routing.hot_us:.2f} us,"
            f" cold {routing.cold_us:.2f} us"
        )
    rebuild = result.rebuild
    _log(
        f"micro rebuild: pod change {rebuild.pod_change_ms:.1f} ms,"
        f" weight change {rebuild.weight_change_ms:.1f} ms"
    )
    return result, None


def _fd_limits(args: argparse.Namespace) -> tuple[int, int, str | None]:
    """Raise RLIMIT_NOFILE for us and our children; lower --rss-connections if it cannot fit."""
    # HAProxy sizes itself for ~2 fds per connection; the others need one per idle client.
    soft, hard = raise_nofile_limit(2 * args.rss_connections + 4096)
    limited = None
    if "rss" not in args.skip and args.rss_connections + FD_HEADROOM > soft:
        fits = max(1, soft - FD_HEADROOM)
        limited = (
            f"open-file limit {soft} (hard {hard}) fits {fits:,} connections, not the"
            f" {args.rss_connections:,} asked for: measured with {fits:,}"
        )
        _log(limited)
        args.rss_connections = fits
    return soft, hard, limited


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    needs_systems = any(phase not in args.skip for phase in ("throughput", "latency", "transfer", "rss"))
    needed = ({"wrk", "nginx"} if needs_systems else set()) | (
        {"haproxy"} if needs_systems and "haproxy" in args.systems else set()
    )
    try:
        ensure_tools(needed, install=not args.no_install)
    except ToolError as exc:
        _log(str(exc))
        return 2

    host = _host_info()
    wanted_rss = args.rss_connections
    soft, hard, rss_limited = _fd_limits(args)  # before any child starts: they inherit it
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="shardgate-bench-"))
    sup = Supervisor(workdir)
    try:
        # First, while nothing else of ours runs: the in-process micro-benchmarks.
        micro, micro_failure = _micro(args)
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
        "skip": args.skip,
        "latency_duration_s": args.latency_duration,
        "latency_runs": args.latency_runs,
        "transfer_runs": args.transfer_runs,
        "transfer_duration_s": args.transfer_duration,
        "transfer_connections": args.transfer_connections,
        "upload_bytes": UPLOAD_BYTES,
        "download_bytes": DOWNLOAD_BYTES,
        "rss_connections": args.rss_connections,
        "rss_connections_asked": wanted_rss,
        "rss_limited_by": rss_limited,
        "nofile_limit": {"soft": soft, "hard": hard},
        "micro_calls": args.micro_calls,
        "micro_repeats": args.micro_repeats,
        "backends": f"nginx, {GROUPS} groups x {PODS_PER_GROUP} pods, 1 worker: return 200;"
        f" {UPLOAD_PATH} reads the body; {DOWNLOAD_PATH} static (sendfile)",
    }
    summary = summarize(records, params, host, micro, micro_failure)
    print(format_table(summary), flush=True)
    write_json(summary, args.output)
    _log(f"wrote {args.output}")
    clean = all(record.status in ("ok", "not-run") for record in records) and micro_failure is None
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
