"""``/metrics`` under real load: promtool-clean, exact, and right with ``--workers 2`` too.

A real gateway (one process, then a supervisor with two workers) runs in front of real upstreams
and a group whose only endpoint refuses connections. A few client threads send a fixed mix of
writes, reads and refusals (missing key, invalid key, unreachable group) while a scraper thread
reads ``/metrics``. Every scrape must pass ``promtool check metrics``, keep counters monotonic and
histograms consistent; once the load stops the counters must equal what the clients received,
series by series. Then a pod leaves the config (its series leave with it) and a bad config is
rejected (counted, epoch kept).
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    KEY_HEADER,
    NO_EJECTION,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    UpstreamFactory,
    group_of,
    render_config,
)
from tests.integration.upstream import UpstreamServer
from tests.observability.conftest import promtool, require_promtool, wait_for

pytestmark = pytest.mark.timeout(90)

THREADS = 4
PER_THREAD = 700  # 2,800 requests per gateway
RECONNECT_EVERY = 35  # new client connections, so that SO_REUSEPORT spreads them over workers
INVALID_KEY = "k" * 300  # over the 256-byte limit

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


# ---------------------------------------------------------------------------------------------
# Scrapes


@dataclass
class Scrape:
    text: str
    samples: dict[SeriesKey, float]
    types: dict[str, str]  # family name -> type

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[SeriesKey, float] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                assert key not in samples, f"duplicate series {key}"
                samples[key] = float(s.value)
        return cls(text, samples, types)

    def series(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {
            lbls: v
            for (n, lbls), v in self.samples.items()
            if n == name and all(dict(lbls).get(k) == want for k, want in labels.items())
        }

    def value(self, name: str, **labels: str) -> float:
        found = self.series(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return next(iter(found.values()))

    def total(self, name: str, **labels: str) -> float:
        return sum(self.series(name, **labels).values())

    def label_sets(self, name: str, *label_names: str) -> set[tuple[str, ...]]:
        return {tuple(dict(lbls)[n] for n in label_names) for lbls in self.series(name)}


def scrape(gw: Gateway) -> Scrape:
    status, headers, body = gw.admin_get("/metrics")
    assert status == 200, status
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    return Scrape.parse(body.decode())


def assert_promtool_clean(text: str, when: str) -> None:
    result = promtool("check", "metrics", stdin=text)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", f"promtool check metrics ({when}):\n{output}"


def assert_histograms_consistent(s: Scrape) -> None:
    """Buckets cumulative and non-decreasing in ``le``; +Inf bucket == _count; _sum >= 0."""
    for family, kind in s.types.items():
        if kind != "histogram":
            continue
        by_labels: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for lbls, value in s.series(family + "_bucket").items():
            rest = tuple((k, v) for k, v in lbls if k != "le")
            by_labels.setdefault(rest, []).append((float(dict(lbls)["le"]), value))
        for rest, buckets in by_labels.items():
            buckets.sort()
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), (family, rest, buckets)
            assert math.isinf(buckets[-1][0]), (family, rest)
            count = s.samples[(family + "_count", rest)]
            assert buckets[-1][1] == count, (family, rest, buckets[-1], count)
            assert s.samples[(family + "_sum", rest)] >= 0


def monotonic_problems(before: Scrape, after: Scrape) -> list[str]:
    """Counter-like series that went down between two scrapes (a reset Prometheus would see)."""
    problems = []
    for (name, lbls), old in before.samples.items():
        if not name.endswith(("_total", "_bucket", "_count", "_sum")):
            continue
        new = after.samples.get((name, lbls))
        if new is not None and new < old:
            problems.append(f"{name}{dict(lbls)}: {old} -> {new}")
    return problems


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Tally:
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (group, kind, class)
    refusals: Counter[str] = field(default_factory=Counter)
    request_id_prefixes: set[str] = field(default_factory=set)  # one per data-plane process
    errors: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.requests.update(other.requests)
        self.refusals.update(other.refusals)
        self.request_id_prefixes |= other.request_id_prefixes
        self.errors.extend(other.errors)

    def total(self) -> int:
        return sum(self.requests.values())


class Setup:
    def __init__(self, upstreams: UpstreamFactory) -> None:
        self.servers = {"m-1": upstreams("m-1", 2), "m-2": upstreams("m-2", 2)}
        self.dead = upstreams.dead_port()
        self.groups: list[GroupSpec] = [
            group_of("m-1", self.servers["m-1"], weight=2),
            group_of("m-2", self.servers["m-2"]),
            group_of("m-dead", [self.dead]),
        ]
        recipe = Recipe(self.groups)
        self.recipe = recipe
        self.write_keys = recipe.keys_owned_by("m-1", 20, "metric") + recipe.keys_owned_by(
            "m-2", 20, "metric"
        )
        self.dead_keys = recipe.keys_owned_by("m-dead", 10, "metric")

    def all_servers(self) -> list[UpstreamServer]:
        return [s for group in self.servers.values() for s in group]

    def received_by_group(self) -> Counter[str]:
        return Counter({g: sum(len(s.requests()) for s in servers) for g, servers in self.servers.items()})

    def pods(self) -> set[tuple[str, str]]:
        return {(g.name, address) for g in self.groups for address in g.endpoints}


def client_thread(port: int, setup: Setup, index: int, out: Tally, lock: threading.Lock) -> None:
    tally = Tally()
    conn: http.client.HTTPConnection | None = None
    try:
        for i in range(PER_THREAD):
            if conn is None or i % RECONNECT_EVERY == 0:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            step = (i + index) % 20
            headers: dict[str, str] = {}
            body: bytes | None = b'{"n": 1}'
            if step < 8:
                key = setup.write_keys[(i * 7 + index) % len(setup.write_keys)]
                method, path, headers[KEY_HEADER] = "POST", "/orders", key
                expect = (200, setup.recipe.owner(key), "write", None)
            elif step < 16 or step == 19:
                method, path, body = "GET", f"/items/{i}", None
                if step == 19:
                    headers[KEY_HEADER] = setup.write_keys[i % len(setup.write_keys)]
                expect = (200, "", "read", None)  # group: the serving pod's
            elif step == 16:
                method, path = "POST", "/orders"
                expect = (400, "none", "write", "missing_shard_key")
            elif step == 17:
                method, path, headers[KEY_HEADER] = "POST", "/orders", INVALID_KEY
                expect = (400, "none", "write", "invalid_shard_key")
            else:
                key = setup.dead_keys[i % len(setup.dead_keys)]
                method, path, headers[KEY_HEADER] = "PUT", "/orders/1", key
                expect = (502, "m-dead", "write", "upstream_error")
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, group, kind, reason = expect
            if resp.status != status:
                tally.errors.append(f"{method} {path} {headers}: {resp.status} {data[:200]!r}")
                continue
            doc = json.loads(data)
            if status == 200 and kind == "read":
                group = doc["group"]
            if reason is not None:
                if doc.get("error") != reason:
                    tally.errors.append(f"{method} {path}: error {doc.get('error')} != {reason}")
                tally.refusals[reason] += 1
            elif doc["group"] != group:
                tally.errors.append(f"write for {headers} served by {doc['group']}, owner {group}")
            tally.requests[(group, kind, f"{status // 100}xx")] += 1
            tally.request_id_prefixes.add((resp.getheader("X-Request-ID") or "").rsplit("-", 1)[0])
            if resp.will_close:
                conn.close()
                conn = None
    except Exception as exc:  # the test reports it; counts are not exact after a broken exchange
        tally.errors.append(f"thread {index}: {type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            conn.close()
        with lock:
            out.add(tally)


def run_load(gw: Gateway, setup: Setup) -> tuple[Tally, list[Scrape]]:
    """Load from THREADS clients while a scraper reads /metrics back to back."""
    tally, lock = Tally(), threading.Lock()
    clients = [
        threading.Thread(target=client_thread, args=(gw.port, setup, i, tally, lock), name=f"load-{i}")
        for i in range(THREADS)
    ]
    scrapes: list[Scrape] = []
    scrape_errors: list[str] = []

    def scraper() -> None:
        while any(t.is_alive() for t in clients):
            try:
                scrapes.append(scrape(gw))
            except Exception as exc:
                scrape_errors.append(f"{type(exc).__name__}: {exc}")
                return
            time.sleep(0.05)  # pacing, not synchronisation

    for thread in clients:
        thread.start()
    scraping = threading.Thread(target=scraper, name="scraper")
    scraping.start()
    for thread in clients:
        thread.join(60)
        assert not thread.is_alive(), "a load thread is stuck"
    scraping.join(30)
    assert scrape_errors == [], scrape_errors
    assert tally.errors == [], tally.errors[:10]
    assert tally.total() == THREADS * PER_THREAD
    assert len(scrapes) >= 2, "the scraper did not scrape during the load"
    return tally, scrapes


def evenly(items: list[Scrape], count: int) -> Iterable[Scrape]:
    if len(items) <= count:
        return items
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_under_load_are_exact_and_promtool_clean(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory, workers: int
) -> None:
    require_promtool()
    setup = Setup(upstreams)
    gw = start_gateway(setup.groups, env={"SHARDGATE_WORKERS": str(workers)}, health=NO_EJECTION)
    tally, during = run_load(gw, setup)
    final = scrape(gw)

    # -- well-formed, during the load and after ------------------------------------------------
    for i, s in enumerate(evenly(during, 4)):
        assert_promtool_clean(s.text, f"during load, scrape {i}")
    assert_promtool_clean(final.text, "after load")
    for s in [*during, final]:
        assert_histograms_consistent(s)
    problems = [
        p for a, b in zip([*during], [*during[1:], final], strict=True) for p in monotonic_problems(a, b)
    ]
    assert problems == [], problems[:10]

    # -- both workers served (request ids carry a per-process prefix) ---------------------------
    assert len(tally.request_id_prefixes) == workers, tally.request_id_prefixes

    # -- requests: exact per (group, kind, code_class); histogram _count per (group, kind) ------
    got = {
        (d["group"], d["kind"], d["code_class"]): v
        for lbls, v in final.series("shardgate_requests_total").items()
        for d in [dict(lbls)]
        if v
    }
    assert got == dict(tally.requests)
    received = setup.received_by_group()
    for group in ("m-1", "m-2"):
        assert tally.requests[(group, "read", "2xx")] > 0
        assert (
            received[group]
            == tally.requests[(group, "read", "2xx")] + tally.requests[(group, "write", "2xx")]
        )
    per_route: Counter[tuple[str, str]] = Counter()
    for (group, kind, _), n in tally.requests.items():
        per_route[(group, kind)] += n
    counts = {
        (dict(lbls)["group"], dict(lbls)["kind"]): v
        for lbls, v in final.series("shardgate_request_duration_seconds_count").items()
    }
    assert counts == dict(per_route)
    assert final.total("shardgate_request_duration_seconds_count") == THREADS * PER_THREAD

    # -- refusals by reason ------------------------------------------------------------------
    refusals = {dict(lbls)["reason"]: v for lbls, v in final.series("shardgate_refusals_total").items() if v}
    assert refusals == dict(tally.refusals)
    dead_writes = tally.refusals["upstream_error"]
    assert dead_writes > 0

    # -- bytes ---------------------------------------------------------------------------------
    assert final.value("shardgate_received_bytes_total") > 0
    assert final.value("shardgate_sent_bytes_total") > 0

    # -- upstreams: connect and response-header latency per group -------------------------------
    connects = final.value("shardgate_upstream_connects_total")
    assert connects == sum(s.connections_opened for s in setup.all_servers())
    connect_counts = final.series("shardgate_upstream_connect_duration_seconds_count")
    assert {dict(lbls)["group"] for lbls in connect_counts} == {"m-1", "m-2"}
    assert sum(connect_counts.values()) == connects
    header_counts = {
        dict(lbls)["group"]: v
        for lbls, v in final.series("shardgate_upstream_response_header_duration_seconds_count").items()
    }
    assert header_counts == dict(received)
    # Every write to the unreachable group tried twice (one pod: a fresh connection is the retry).
    failures = final.value("shardgate_upstream_connect_failures_total")
    retries = final.value("shardgate_upstream_retries_total")
    assert failures >= 2 * dead_writes and retries >= dead_writes
    assert failures - retries == dead_writes

    # -- pods: series for exactly the configured pods --------------------------------------------
    assert final.label_sets("shardgate_pod_inflight_requests", "group", "pod") == setup.pods()
    assert final.label_sets("shardgate_pod_upstream_connections", "group", "pod", "state") == {
        (g, p, state) for g, p in setup.pods() for state in ("idle", "busy")
    }
    assert wait_for(lambda: scrape(gw).total("shardgate_pod_inflight_requests") == 0)
    pooled = final.total("shardgate_pod_upstream_connections", state="idle")
    assert pooled > 0, "keep-alive connections to the upstreams are pooled after the load"
    assert final.total("shardgate_pod_upstream_connections", group="m-dead") == 0
    for group in ("m-1", "m-2"):
        assert final.value("shardgate_group_pods", group=group, state="ready") == 2

    # -- ring, config, loop ----------------------------------------------------------------------
    ring = gw.debug_ring()
    epoch = ring["epoch"]
    assert final.series("shardgate_config_epoch_info") == {(("epoch", epoch),): 1.0}
    assert final.value("shardgate_ring_groups") == 3
    assert final.value("shardgate_ring_points") == ring["ring"]["points"] > 0
    assert final.value("shardgate_config_reloads_total", result="applied") == 1
    assert final.value("shardgate_config_reloads_total", result="rejected") == 0
    assert wait_for(lambda: scrape(gw).value("shardgate_event_loop_lag_seconds_count") > 0)
    assert final.types["shardgate_event_loop_lag_seconds"] == "histogram"
    assert (
        final.value("shardgate_client_connections_accepted_total") >= THREADS * PER_THREAD / RECONNECT_EVERY
    )
    if workers > 1:
        assert final.value("shardgate_workers_ready") == workers
        assert final.value("shardgate_worker_restarts_total") == 0
    else:
        assert "shardgate_workers_ready" not in final.types

    # -- a pod leaves the config: its series leave with it ---------------------------------------
    gone = setup.servers["m-2"][1].address
    kept = [g if g.name != "m-2" else GroupSpec("m-2", g.endpoints[:1], g.weight) for g in setup.groups]
    gw.write_config(render_config(kept))
    new_epoch = gw.wait_for_epoch_change(epoch)
    want_pods = setup.pods() - {("m-2", gone)}
    assert wait_for(
        lambda: scrape(gw).label_sets("shardgate_pod_inflight_requests", "group", "pod") == want_pods
    )
    after = scrape(gw)
    assert_promtool_clean(after.text, "after a pod left")
    assert after.label_sets("shardgate_pod_upstream_connections", "group", "pod") == want_pods
    assert not any(
        dict(lbls).get("pod") == gone for name, lbls in after.samples if name.startswith("shardgate_")
    )
    assert after.value("shardgate_group_pods", group="m-2", state="ready") == 1
    assert after.series("shardgate_config_epoch_info") == {(("epoch", new_epoch),): 1.0}
    assert after.value("shardgate_config_reloads_total", result="applied") == 2
    assert monotonic_problems(final, after) == []

    # -- a bad config: rejected, counted, the epoch in force stays ------------------------------
    gw.write_config("version: 1\ngroups: []\n")
    assert wait_for(lambda: scrape(gw).value("shardgate_config_reloads_total", result="rejected") == 1)
    rejected = scrape(gw)
    assert rejected.series("shardgate_config_epoch_info") == {(("epoch", new_epoch),): 1.0}
    assert rejected.value("shardgate_config_reloads_total", result="applied") == 2
    assert gw.epoch() == new_epoch
