"""Running wrk and parsing its text report (`--latency` distribution, error counters)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import terminate_group
from bench.tools import find_tool

SCRIPT = Path(__file__).resolve().parent / "post.lua"  # replays a requests file (bench/shapes.py)
TRANSFER_SCRIPT = Path(__file__).resolve().parent / "transfer.lua"

# wrk prints times with these units (see its format_time / units_time).
_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)"

_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9]+(?:\.[0-9]+)?)", re.M)
_PERCENTILE_RE = re.compile(rf"^\s+(50|75|90|99)%\s+{_TIME}\s*$", re.M)
_TOTAL_RE = re.compile(rf"^\s+([0-9]+) requests in {_TIME},", re.M)
# wrk prints byte counts with binary units: "1.20GB read" means 1.20 GiB.
_READ_RE = re.compile(r"requests in [^,]+, ([0-9]+(?:\.[0-9]+)?)([KMGTP]?)B read")
_MEAN_RE = re.compile(rf"^\s+Latency\s+{_TIME}\s", re.M)  # "Thread Stats" row: Avg first
_BINARY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SOCKET_RE = re.compile(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)")
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")


class WrkError(RuntimeError):
    pass


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    mean_ms: float | None = None
    read_bytes: int | None = None  # every byte wrk read, partial responses included (approximate)
    mib_s: float | None = None  # payload rate, set by the transfer measurement
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        return data


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the report of `wrk --latency`; raise WrkError if a required figure is missing."""
    rps = _RPS_RE.search(text)
    total = _TOTAL_RE.search(text)
    percentiles = {m.group(1): _to_ms(m.group(2), m.group(3)) for m in _PERCENTILE_RE.finditer(text)}
    if rps is None or total is None or "50" not in percentiles or "99" not in percentiles:
        raise WrkError(f"cannot parse wrk output:\n{text.strip()}")
    result = WrkResult(
        rps=float(rps.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(total.group(1)),
        duration_s=_to_ms(total.group(2), total.group(3)) / 1e3,
    )
    mean = _MEAN_RE.search(text)
    if mean:
        result.mean_ms = _to_ms(mean.group(1), mean.group(2))
    read = _READ_RE.search(text)
    if read:
        result.read_bytes = round(float(read.group(1)) * _BINARY_UNITS[read.group(2)])
    socket = _SOCKET_RE.search(text)
    if socket:
        result.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True)
        )
    non2xx = _NON2XX_RE.search(text)
    if non2xx:
        result.non_2xx = int(non2xx.group(1))
    return result


def wrk_argv(
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    timeout_s: int = 2,
    script: Path = SCRIPT,
    script_args: Sequence[str] = (),
) -> list[str]:
    argv = [
        find_tool("wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    return [*argv, "--", *script_args] if script_args else argv


def run_wrk(
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    timeout_s: int = 2,
    script: Path = SCRIPT,
    script_args: Sequence[str] = (),
) -> WrkResult:
    """Run one wrk load test and parse it; wrk is killed if we are interrupted."""
    argv = wrk_argv(
        url,
        duration=duration,
        connections=connections,
        threads=threads,
        timeout_s=timeout_s,
        script=script,
        script_args=script_args,
    )
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=duration + timeout_s + 30)
    except BaseException:
        terminate_group(proc, timeout=2.0)
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with status {proc.returncode}:\n{text.strip()}")
    return parse_wrk_output(text)
