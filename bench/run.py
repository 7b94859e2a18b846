"""Benchmark shardgate against nginx and HAProxy in front of the same backends, in one sitting.

    python -m bench.run [--runs 5] [--duration 10] [--warmup 2]
                        [--systems shardgate,shardgate-pure,nginx,haproxy] [--shapes ingress,bare]
                        [--skip throughput,latency,transfer,rss,micro] [--record NAME]

One run measures, in this order: the micro-benchmarks (routing decision, topology rebuild; in a
process of each gateway build), throughput (wrk -c64), latency at concurrency 1 (proxy and
direct, hence the latency a proxy adds), upload and download rates (1 MiB POSTs, 10 MiB GETs),
and the memory of each proxy holding 10,000 idle keep-alive connections. Throughput and latency
are measured with Ingress-shaped requests (what ingress-nginx forwards; the targets judge these)
and with bare ones. Within each measurement the runs alternate between the systems (A, B, C, A,
B, C, ...) so that machine drift hits all of them alike; each measured wrk run is preceded by a
short unmeasured warm-up against the same system. A "direct" row (wrk straight at one backend) is
the reference ceiling. shardgate takes its config from the Kubernetes source (an API-server
double), as in production. The medians, ratios to nginx, target verdicts and every run's
figures go to stdout (one table), to bench/results/latest.json and latest.md, and with
`--record NAME` to bench/results/NAME.json and NAME.md (to be committed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.build import probe_build
from bench.configs import (
    DOWNLOAD_BYTES,
    DOWNLOAD_PATH,
    GROUPS,
    HOST,
    PODS_PER_GROUP,
    PROBE_PATH,
    UPLOAD_BYTES,
    UPLOAD_PATH,
    render_shard_config,
)
from bench.headers import CaptureServer, check_headers
from bench.idle import measure_idle
from bench.k8s import start_apiserver
from bench.machine import describe_machine
from bench.micro import run_micro_process
from bench.procs import Managed, StartupError, Supervisor, free_ports, raise_nofile_limit
from bench.report import PHASES, SystemRecord, micro_failed, summarize, write_json, write_text
from bench.shapes import LABELS, SHAPES, write_requests
from bench.systems import (
    DIRECT,
    PROXY_SYSTEMS,
    REPO_ROOT,
    SHARDGATE_SYSTEMS,
    KubernetesSource,
    Target,
    gateway_python,
    serving_pids,
    shardgate_env,
    start_backends,
    start_haproxy,
    start_nginx_proxy,
    start_shardgate,
)
from bench.tables import format_markdown, format_table
from bench.tools import ToolError, ensure_tools
from bench.wrk import TRANSFER_SCRIPT, WrkError, WrkResult, run_wrk
from gateway.config import parse_shard_config
from gateway.ring import config_epoch

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "latest.json"
MIB = 1024 * 1024
TRANSFER_TIMEOUT_S = 10  # wrk per-request timeout for 1 MiB / 10 MiB requests
FD_HEADROOM = 512  # file descriptors the harness keeps for itself beside the idle connections
RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
        return list(dict.fromkeys(names))  # keep order, drop repeats

    return parse


def _non_empty(parse: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    def checked(text: str) -> list[str]:
        names = parse(text)
        if not names:
            raise argparse.ArgumentTypeError("name at least one")
        return names

    return checked


def _record_name(text: str) -> str:
    if not RECORD_NAME.fullmatch(text) or text == "latest":
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '.', '_', '-' (and not 'latest')")
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=_positive_int,
        default=5,
        help="measured throughput runs per system and shape (default 5: the targets judge the median)",
    )
    parser.add_argument(
        "--duration", type=_positive_int, default=10, help="seconds per throughput run (default 10)"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="unmeasured seconds before each wrk run"
    )
    parser.add_argument(
        "--systems",
        type=_non_empty(_choices((*PROXY_SYSTEMS, DIRECT))),
        default=list(PROXY_SYSTEMS),
        help=f"comma-separated, in rotation order (default {','.join(PROXY_SYSTEMS)})",
    )
    parser.add_argument(
        "--shapes",
        type=_non_empty(_choices(SHAPES)),
        default=list(SHAPES),
        help="request shapes of the throughput and latency rows (default ingress,bare; targets: ingress)",
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the direct-to-backend reference row")
    parser.add_argument(
        "--skip",
        type=_choices(PHASES),
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
        help="concurrency-1 runs per system and shape (default 2 x min(--runs, 3) + 1)",
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
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path (Markdown beside it, .md)"
    )
    parser.add_argument(
        "--record",
        type=_record_name,
        metavar="NAME",
        help="also write NAME.json and NAME.md into --results-dir: a run to commit and quote",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where --record writes (default bench/results)"
    )
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


def shard_epoch() -> str:
    """The epoch the gateway computes for the benchmark's shard config (nginx and HAProxy send it too)."""
    return config_epoch(parse_shard_config(render_shard_config()))


class Sitting:
    """What the systems of one sitting share: supervisor, temp dir, backends, config source."""

    def __init__(self, args: argparse.Namespace, sup: Supervisor, workdir: Path) -> None:
        self.args = args
        self.sup = sup
        self.workdir = workdir
        self.epoch = shard_epoch()
        self.backend_ports = free_ports(GROUPS * PODS_PER_GROUP)
        self.backends: Managed | None = None
        self.source: KubernetesSource | None = None

    def start_backends(self, capture: CaptureServer) -> Managed:
        ports = ",".join(map(str, self.backend_ports))
        _log(f"starting backends on {HOST}:{ports} (temp dir {self.workdir})")
        self.backends = start_backends(self.sup, self.workdir, self.backend_ports, capture.path)
        return self.backends

    def start_source(self) -> KubernetesSource:
        (port,) = free_ports(1)
        _log(f"starting the Kubernetes API-server double on {HOST}:{port}")
        _, kubeconfig = start_apiserver(
            self.sup, self.workdir, gateway_python(), port, self.backend_ports, REPO_ROOT,
            self.args.startup_timeout,
        )  # fmt: skip
        self.source = KubernetesSource(kubeconfig)
        return self.source

    def start(self, name: str, port: int) -> Target:
        args, sup, workdir, ports = self.args, self.sup, self.workdir, self.backend_ports
        timeout, clients = args.startup_timeout, args.rss_connections
        if name == "nginx":
            return start_nginx_proxy(sup, workdir, port, ports, self.epoch, timeout, clients)
        if name == "haproxy":
            return start_haproxy(sup, workdir, port, ports, self.epoch, timeout, clients)
        source = self.source or self.start_source()
        (admin,) = free_ports(1)
        return start_shardgate(sup, name, port, admin, source, timeout)


def _start_systems(
    names: Sequence[str], sitting: Sitting, records: dict[str, SystemRecord]
) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for name, port in zip(names, free_ports(len(names)), strict=True):
        _log(f"starting {name} on {HOST}:{port}")
        try:
            target = targets[name] = sitting.start(name, port)
        except (StartupError, RuntimeError, OSError) as exc:
            records[name].failure = f"did not start: {exc}"
            _log(f"{name} FAILED to start: {exc}")
            continue
        record = records[name]
        record.build, record.config_source = target.build, target.config_source
        if record.build is not None:
            _log(f"{name} runs the {record.build.build} build of the gateway")
        record.headers = check_headers(port, sitting.epoch)
        for problem in record.headers.problems:
            _log(f"{name} header check: {problem}")
    return targets


class Bench:
    """The systems of one sitting and the measurements over them."""

    def __init__(
        self,
        args: argparse.Namespace,
        records: dict[str, SystemRecord],
        targets: dict[str, Target],
        backends: Managed,
        requests: dict[str, Path],
    ) -> None:
        self.args = args
        self.records = records
        self.targets = targets
        self.backends = backends
        self.requests = requests  # shape -> pre-formatted requests file for post.lua

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
        variants: Sequence[str],
        measure: Callable[[Target, str], WrkResult],
        store: Callable[[SystemRecord, str], list[WrkResult]],
        describe: Callable[[WrkResult], str],
        rounds: int,
    ) -> None:
        """`rounds` rounds; in each, every active system is measured once per variant, in turn."""
        for round_no in range(1, rounds + 1):
            for record, target in self._active():
                for variant in variants:
                    if record.failure is not None:
                        break
                    label = f"{phase} {variant} run {round_no}"
                    try:
                        result = measure(target, variant)
                    except (WrkError, subprocess.TimeoutExpired, OSError) as exc:
                        record.failure = f"{label}: {exc}"
                        _log(f"{record.name} {label} FAILED: {exc}")
                        continue
                    store(record, variant).append(result)
                    progress = f"{phase} {variant:8s} {round_no}/{rounds} {record.name:14s}"
                    _log(f"{progress} {describe(result)}  errors {result.errors}")
                    self._checked(record, target, label)

    def _post(self, target: Target, shape: str, duration: int, connections: int, threads: int) -> WrkResult:
        options: dict[str, Any] = {
            "connections": connections,
            "threads": threads,
            "script_args": (str(self.requests[shape]),),
        }
        if self.args.warmup:
            run_wrk(target.url, duration=self.args.warmup, **options)
        return run_wrk(target.url, duration=duration, **options)

    def throughput(self) -> None:
        args = self.args
        self._rotate(
            "throughput",
            args.shapes,
            lambda target, shape: self._post(target, shape, args.duration, args.connections, args.threads),
            lambda record, shape: record.throughput.setdefault(shape, []),
            lambda r: f"{r.rps:10,.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms",
            args.runs,
        )

    def latency(self) -> None:
        args = self.args
        self._rotate(
            "latency",
            args.shapes,
            lambda target, shape: self._post(target, shape, args.latency_duration, 1, 1),
            lambda record, shape: record.latency.setdefault(shape, []),
            lambda r: f"p50 {r.p50_ms * 1e3:7.0f} us  mean {(r.mean_ms or 0) * 1e3:7.0f} us",
            args.latency_runs,
        )

    def _transfer_once(self, target: Target, kind: str) -> WrkResult:
        args = self.args
        method, path, size = ("POST", UPLOAD_PATH, UPLOAD_BYTES) if kind == "upload" else (
            "GET", DOWNLOAD_PATH, DOWNLOAD_BYTES)  # fmt: skip
        options: dict[str, Any] = {
            "connections": args.transfer_connections,
            "threads": 1,
            "timeout_s": TRANSFER_TIMEOUT_S,
            "script": TRANSFER_SCRIPT,
            "script_args": (method, path, str(size if method == "POST" else 0)),
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

    def transfer(self) -> None:
        for kind in ("upload", "download"):
            self._rotate(
                kind,
                [kind],
                self._transfer_once,
                lambda record, kind: record.upload_runs if kind == "upload" else record.download_runs,
                lambda r: f"{r.mib_s or 0:8,.0f} MiB/s  ({r.requests} requests)",
                self.args.transfer_runs,
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
                f"idle {record.name:14s} {result.still_open:,}/{count:,} open in {result.open_s:.1f}s,"
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

    requests = {shape: write_requests(workdir / f"requests-{shape}.bin", shape) for shape in args.shapes}
    sitting = Sitting(args, sup, workdir)
    capture = CaptureServer(workdir / "capture.sock").start()
    try:
        backends = sitting.start_backends(capture)
        targets = _start_systems(proxies, sitting, records)
        if with_direct:
            targets[DIRECT] = Target(DIRECT, sitting.backend_ports[0], None, reference=True)
        bench = Bench(args, records, targets, backends, requests)
        steps: dict[str, Callable[[], None]] = {
            "throughput": bench.throughput,
            "latency": bench.latency,
            "transfer": bench.transfer,
            "rss": bench.idle_connections,
        }
        for phase in wrk_phases:
            steps[phase]()
    finally:
        capture.stop()
    return list(records.values())


def run_micro(args: argparse.Namespace) -> dict[str, Any] | None:
    """The micro-benchmarks in a process of each selected gateway build."""
    builds = [name for name in args.systems if name in SHARDGATE_SYSTEMS]
    if "micro" in args.skip or not builds:
        return None
    systems: dict[str, Any] = {}
    for name in builds:
        _log(
            f"micro-benchmarks ({name}): {args.micro_repeats} x {args.micro_calls:,} routing calls, rebuilds"
        )
        env = shardgate_env(name)
        try:
            result = run_micro_process(gateway_python(), env, REPO_ROOT, args.micro_calls, args.micro_repeats)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            _log(f"micro-benchmarks ({name}) FAILED: {exc}")
            systems[name] = {"failure": str(exc)}
            continue
        result["build"] = probe_build(gateway_python(), env, REPO_ROOT).build
        for routing in result["routing"]:
            _log(
                f"micro {name} {routing['groups']}x{routing['pods_per_group']}: route hot"
                f" {routing['hot_us']:.2f} us, cold {routing['cold_us']:.2f} us ({result['build']} build)"
            )
        systems[name] = result
    return {"calls": args.micro_calls, "repeats": args.micro_repeats, "systems": systems}


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


def _params(args: argparse.Namespace, argv: Sequence[str], records: list[SystemRecord]) -> dict[str, Any]:
    return {
        "argv": list(argv),
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "threads": args.threads,
        "systems": [record.name for record in records],
        "shapes": args.shapes,
        "shape_labels": {shape: LABELS[shape] for shape in args.shapes},
        "skip": args.skip,
        "latency_duration_s": args.latency_duration,
        "latency_runs": args.latency_runs,
        "transfer_runs": args.transfer_runs,
        "transfer_duration_s": args.transfer_duration,
        "transfer_connections": args.transfer_connections,
        "upload_bytes": UPLOAD_BYTES,
        "download_bytes": DOWNLOAD_BYTES,
        "rss_connections": args.rss_connections,
        "micro_calls": args.micro_calls,
        "micro_repeats": args.micro_repeats,
        "backends": f"nginx, {GROUPS} groups x {PODS_PER_GROUP} pods, 1 worker: return 200;"
        f" {UPLOAD_PATH} reads the body; {DOWNLOAD_PATH} static (sendfile)",
        "shardgate_source": "kubernetes: ConfigMap shards/shardgate-shards (3 groups, service + port http),"
        " one EndpointSlice per pod; API-server double tests/k8s/apiserver.py in its own process",
        "epoch": shard_epoch(),
    }


def _write_reports(summary: dict[str, Any], args: argparse.Namespace) -> None:
    write_json(summary, args.output)
    write_text(format_markdown(summary), args.output.with_suffix(".md"))
    _log(f"wrote {args.output} and {args.output.with_suffix('.md').name}")
    if args.record:
        base = args.results_dir / args.record
        write_json(summary, base.with_suffix(".json"))
        write_text(format_markdown(summary, args.record), base.with_suffix(".md"))
        _log(f"recorded {base}.json and {base}.md: commit them with the README that quotes them")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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

    host = describe_machine(REPO_ROOT)
    wanted_rss = args.rss_connections
    soft, hard, rss_limited = _fd_limits(args)  # before any child starts: they inherit it
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="shardgate-bench-"))
    sup = Supervisor(workdir)
    try:
        # First, while nothing else of ours runs: the micro-benchmarks.
        micro = run_micro(args)
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

    params = _params(args, argv, records)
    params.update(
        rss_connections_asked=wanted_rss,
        rss_limited_by=rss_limited,
        nofile_limit={"soft": soft, "hard": hard},
    )
    summary = summarize(records, params, host, micro)
    print(format_table(summary), flush=True)
    _write_reports(summary, args)
    clean = all(record.status in ("ok", "not-run") for record in records) and not micro_failed(micro)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
