"""Rate limits with real processes (docs/contract.md "Rate limits"): a hot key held to its rate
while other keys are not; with Redis, one per-key bucket exact across two gateway processes,
and every request still answered (fail open) once Redis is killed; with --workers, a replica as
a whole lets through no more than its limits."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    KEY_HEADER,
    Gateway,
    GatewayFactory,
    UpstreamFactory,
    assert_json_error,
    config_document,
    group_of,
    http_request,
)
from tests.redis_server import redis_server

pytestmark = pytest.mark.timeout(90)


def with_limits(groups: list[Any], limits: dict[str, Any]) -> str:
    document = config_document(groups)
    document["limits"] = limits
    return yaml.safe_dump(document, sort_keys=False)


def write(gw: Gateway, key: str) -> int:
    return http_request(gw.port, "POST", "/w", {KEY_HEADER: key}, b"{}").status


def test_a_hot_key_is_held_to_its_rate_while_other_keys_are_not(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    pods = upstreams("g", 2)
    groups = [group_of("g", pods)]
    rate, burst = 20.0, 10
    gw = start_gateway(with_limits(groups, {"per_key": {"rate": rate, "burst": burst}}))
    hot_ok = hot_refused = 0
    others = []
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        status = write(gw, "hot-user")
        assert status in (200, 429)
        hot_ok += status == 200
        hot_refused += status == 429
        others.append(write(gw, f"user-{len(others)}"))  # a different key each time
    elapsed = time.monotonic() - started
    # The hot key got its burst and its rate over the time it was sent, and no more.
    assert hot_ok <= burst + rate * elapsed + 1
    assert hot_ok >= burst + rate * 1.5  # (it was sent far faster than its rate for 2 s)
    assert hot_refused > 0
    assert others == [200] * len(others)
    landed = [r for p in pods for r in p.requests() if r.header(KEY_HEADER) == "hot-user"]
    assert len(landed) == hot_ok  # the refused ones never reached a pod
    assert gw.metric("shardgate_rate_limited_requests_total", limit="per_key") == hot_refused
    answer = http_request(gw.port, "POST", "/w", {KEY_HEADER: "hot-user"}, b"{}")
    if answer.status == 429:  # (a token may just have come back)
        assert_json_error(answer.status, answer.headers, answer.body, 429, "rate_limited")
        assert answer.header("RateLimit-Policy") == f'"per_key";q={int(rate)};w=1'  # (a second at the rate)
        assert answer.header("Retry-After") == "1"


def test_the_redis_bucket_is_exact_across_two_gateways_and_fails_open_without_redis(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    groups = [group_of("g", upstreams("g", 2))]
    burst = 12
    with redis_server() as redis:
        limits = {"per_key": {"rate": 0.001, "burst": burst}, "redis_url": redis.url, "redis_timeout": 0.5}
        text = with_limits(groups, limits)
        first, second = start_gateway(text), start_gateway(text)
        statuses = [write(gw, "alice") for _ in range(15) for gw in (first, second)]
        assert statuses.count(200) == burst  # one bucket for both, to the token
        assert statuses[: 2 * 6] == [200] * 12 and set(statuses[12:]) == {429}
        assert write(first, "bob") == 200 and write(second, "bob") == 200
        redis.kill()
        # Fail open: each gateway's own bucket decides (its own count, from full).
        after = [write(gw, "carol") for gw in (first, second) for _ in range(3)]
        assert after == [200] * 6
        for gw in (first, second):
            fallbacks = sum(
                gw.metric("shardgate_rate_limit_fallbacks_total", reason=r)
                for r in ("error", "timeout", "unavailable")
            )
            assert fallbacks == 3
            assert gw.metric("shardgate_rate_limit_fallbacks_total", reason="unavailable") == 2
        assert http_request(first.port, "GET", "/r", {KEY_HEADER: "carol"}).status == 200


def test_with_workers_a_replica_lets_through_no_more_than_its_limits(
    start_gateway: GatewayFactory, upstreams: UpstreamFactory
) -> None:
    groups = [group_of("g", upstreams("g", 2))]
    burst = 10
    gw = start_gateway(
        with_limits(groups, {"global": {"rate": 0.001, "burst": burst}}), args=["--workers", "2"]
    )
    # A new connection each time: SO_REUSEPORT spreads them over both workers.
    statuses = [http_request(gw.port, "GET", "/r").status for _ in range(60)]
    assert set(statuses) == {200, 429}
    assert statuses.count(200) <= burst  # each worker keeps half of the bucket
    assert gw.metric("shardgate_rate_limited_requests_total", limit="global") == statuses.count(429)
