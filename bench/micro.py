"""In-process micro-benchmarks of the gateway's routing and topology code (imports `gateway`).

Routing: `router.decide` + `router.choose_pod` per request, the work the data plane does to pick
a pod for a write (`POST` with a `User-ID`):

- hot cache: the keys cycle over 10,000 ids (the wrk load's working set), all already in the
  ring's key cache;
- cold cache: every key is new (never seen by the ring), so each call validates the key,
  hashes it on the ketama ring (uhashring) and remembers it.

Each repeat times `calls` calls in a plain loop with the garbage collector off (like `timeit`);
the figure is the median over the repeats of (repeat time / calls), loop overhead included
(~0.03 us). Measured on the benchmark's own shape (3 groups x 2 pods) and on a large one
(64 groups x 16 pods: the pod choice is then among 16 candidates).

Topology rebuild (64 groups x 16 pods, configs from `gateway.config.parse_shard_config`):
`TopologyBuilder.build` after a pod-only change (one endpoint of one group replaced: the ring is
reused) and after a weight change (one group's weight: the ring is rebuilt inside `build`).
Alternating between two configs makes every timed build a real change.

The harness runs this module as `python -m bench.micro --calls N --repeats N` (JSON on stdout)
with the interpreter and environment of each shardgate system, so that each build (compiled,
`SHARDGATE_PURE_PYTHON=1`) is measured in a process that imported that build and nothing else.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.config import ShardConfig, parse_shard_config
from gateway.ring import ShardRing
from gateway.router import Decision, choose_pod, decide
from gateway.topology import Topology, TopologyBuilder

HOT_KEYS = 10_000
METHOD = b"POST"
SHAPES: tuple[tuple[int, int], ...] = ((3, 2), (64, 16))
REBUILD_SHAPE = (64, 16)


@dataclass
class RoutingResult:
    groups: int
    pods_per_group: int
    hot_us: float
    cold_us: float
    hot_runs_us: list[float]
    cold_runs_us: list[float]


@dataclass
class RebuildResult:
    groups: int
    pods_per_group: int
    pod_change_ms: float
    weight_change_ms: float
    ring_only_ms: float  # ShardRing(config) alone: the part the gateway builds off the event loop
    pod_change_runs_ms: list[float]
    weight_change_runs_ms: list[float]


@dataclass
class MicroResult:
    calls: int
    repeats: int
    routing: list[RoutingResult]
    rebuild: RebuildResult

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_config_text(groups: int, pods: int, *, moved_pod: bool = False, first_weight: int = 1) -> str:
    """YAML for `groups` x `pods` endpoint groups; variants move one pod or reweight group-1."""
    lines = ["version: 1", "routing:", "  key_header: User-ID", "ring:", "  vnodes: 160", "groups:"]
    for g in range(groups):
        endpoints = []
        for p in range(pods):
            port = 8081 if moved_pod and g == 0 and p == 0 else 8080
            endpoints.append(f'"10.{g // 250}.{g % 250}.{p + 1}:{port}"')
        weight = first_weight if g == 0 else 1
        lines += [
            f"  - name: group-{g + 1}",
            f"    weight: {weight}",
            f"    endpoints: [{', '.join(endpoints)}]",
        ]
    return "\n".join(lines) + "\n"


def _config(groups: int, pods: int, **variant: Any) -> ShardConfig:
    return parse_shard_config(shard_config_text(groups, pods, **variant))


def _route_loop(topology: Topology, keys: Sequence[bytes]) -> float:
    method = METHOD
    start = time.perf_counter()
    for key in keys:
        decision = decide(topology, method, key, None)
        choose_pod(decision.candidates)  # type: ignore[union-attr]  # checked in _check_routes
    return time.perf_counter() - start


def _check_routes(topology: Topology, key: bytes) -> None:
    decision = decide(topology, METHOD, key, None)
    if not isinstance(decision, Decision) or choose_pod(decision.candidates) is None:
        raise RuntimeError(f"the micro-benchmark topology does not route {key!r}: {decision!r}")


def _timed(repeats: int, run: Callable[[int], float]) -> list[float]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [run(index) for index in range(repeats)]
    finally:
        if enabled:
            gc.enable()


def bench_routing(groups: int, pods: int, calls: int, repeats: int) -> RoutingResult:
    topology = TopologyBuilder().build(_config(groups, pods))
    hot_set = [b"user-%05d" % i for i in range(HOT_KEYS)]
    _check_routes(topology, hot_set[0])
    hot_keys = (hot_set * (calls // HOT_KEYS + 1))[:calls]
    _route_loop(topology, hot_set)  # fill the key cache
    hot = _timed(repeats, lambda _: _route_loop(topology, hot_keys) / calls * 1e6)

    def cold_run(index: int) -> float:
        keys = [b"cold-%d-%07d" % (index, i) for i in range(calls)]  # never seen before
        return _route_loop(topology, keys) / calls * 1e6

    cold = _timed(repeats, cold_run)
    return RoutingResult(
        groups=groups,
        pods_per_group=pods,
        hot_us=statistics.median(hot),
        cold_us=statistics.median(cold),
        hot_runs_us=[round(v, 4) for v in hot],
        cold_runs_us=[round(v, 4) for v in cold],
    )


def _alternating_builds(
    builder: TopologyBuilder, configs: tuple[ShardConfig, ShardConfig], count: int, expect_new_ring: bool
) -> list[float]:
    previous = builder.build(configs[0])
    times: list[float] = []
    for index in range(count):
        config = configs[(index + 1) % 2]
        start = time.perf_counter()
        topology = builder.build(config)
        times.append((time.perf_counter() - start) * 1e3)
        if (topology.ring is not previous.ring) != expect_new_ring:
            raise RuntimeError("the topology builder did not (re)use the ring as expected")
        previous = topology
    return times


def bench_rebuild(groups: int, pods: int, repeats: int) -> RebuildResult:
    base = _config(groups, pods)
    moved = _config(groups, pods, moved_pod=True)
    reweighted = _config(groups, pods, first_weight=2)
    pod_runs = _alternating_builds(TopologyBuilder(), (base, moved), max(5, 4 * repeats), False)
    weight_runs = _alternating_builds(TopologyBuilder(), (base, reweighted), repeats, True)
    ring_runs: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        ShardRing(reweighted)
        ring_runs.append((time.perf_counter() - start) * 1e3)
    return RebuildResult(
        groups=groups,
        pods_per_group=pods,
        pod_change_ms=statistics.median(pod_runs),
        weight_change_ms=statistics.median(weight_runs),
        ring_only_ms=statistics.median(ring_runs),
        pod_change_runs_ms=[round(v, 3) for v in pod_runs],
        weight_change_runs_ms=[round(v, 3) for v in weight_runs],
    )


def run_micro(calls: int, repeats: int) -> MicroResult:
    routing = [bench_routing(groups, pods, calls, repeats) for groups, pods in SHAPES]
    rebuild = bench_rebuild(*REBUILD_SHAPE, repeats)
    return MicroResult(calls=calls, repeats=repeats, routing=routing, rebuild=rebuild)


def run_micro_process(
    python: str, env: Mapping[str, str], cwd: Path, calls: int, repeats: int, timeout: float = 1800.0
) -> dict[str, Any]:
    """`run_micro` in a child process (``python -m bench.micro``); its JSON document."""
    result = subprocess.run(
        [python, "-m", "bench.micro", "--calls", str(calls), "--repeats", str(repeats)],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise RuntimeError(f"python -m bench.micro exited with status {result.returncode}: {detail}")
    document: dict[str, Any] = json.loads(lines[-1])
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="routing calls per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats")
    args = parser.parse_args(argv)
    print(json.dumps(run_micro(args.calls, args.repeats).to_json()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
