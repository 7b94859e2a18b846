"""Rate limits (gateway.proxy.ratelimit, docs/contract.md "Rate limits"): token buckets global,
per group and per key; 429 rate_limited with Retry-After and the RateLimit fields; a refused
request gives its other tokens back; the per-key buckets are bounded; with a Redis server the
per-key buckets are Redis's, and Redis down means the local ones decide (fail open).

In process: the client protocol on a fake transport, in front of real upstream servers on
127.0.0.1, and a real redis-server where Redis is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from gateway.config import BucketConfig, Limits, parse_shard_config
from gateway.proxy.client import ClientConnection
from gateway.proxy.context import ProxyContext
from gateway.proxy.ratelimit import Bucket, KeyBuckets, Limit, RateLimiter
from gateway.topology import TopologyBuilder
from tests.proxy.harness import (
    KEY_HEADER,
    FakeTransport,
    Harness,
    RecordingUpstream,
    harness,
    responses_in,
)
from tests.proxy.test_fenced_writes import post
from tests.redis_server import RedisServer, redis_server

SLOW = 0.001  # tokens per second: no bucket refills while a test runs


def build(plane: Harness, limits: str, groups: int = 1) -> list[RecordingUpstream]:
    """Groups g0.. of one pod each, and the ``limits`` section (YAML flow mapping)."""
    upstreams = []
    lines = []
    for n in range(groups):
        upstream = RecordingUpstream()
        plane.run(upstream.start())
        upstreams.append(upstream)
        lines.append(f"  - name: g{n}\n    endpoints: {json.dumps([f'127.0.0.1:{upstream.port}'])}\n")
    text = f"version: 1\nrouting: {{key_header: {KEY_HEADER}}}\nlimits: {limits}\ngroups:\n" + "".join(lines)
    plane.holder.swap(TopologyBuilder().build(parse_shard_config(text)))
    return upstreams


def send(plane: Harness, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    client, transport = plane.connect()
    plane.feed(client, [request])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 1)
    ((response),) = responses_in(bytes(transport.written))
    return response


def statuses(plane: Harness, key: str, count: int) -> list[int]:
    return [send(plane, post(b"{}", key))[0] for _ in range(count)]


def read(key: str | None = None) -> bytes:
    field = f"{KEY_HEADER}: {key}\r\n" if key is not None else ""
    return f"GET /r HTTP/1.1\r\nHost: t\r\n{field}\r\n".encode()


def owner_of(plane: Harness, key: str) -> str:
    topology = plane.holder.current
    assert topology is not None
    return topology.ring.resolve(key.encode(), key.encode())


@pytest.fixture
def plane() -> Iterator[Harness]:
    with harness() as plane:
        yield plane


def test_a_hot_key_is_limited_to_its_burst_and_other_keys_are_not(plane: Harness) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 3}}}}")
    assert statuses(plane, "alice", 5) == [200, 200, 200, 429, 429]
    assert statuses(plane, "bob", 3) == [200, 200, 200]
    assert plane.metrics.rate_limits == {"per_key": 2}
    assert plane.metrics.refusals == {"rate_limited": 2}


def test_a_429_carries_the_contract_error_retry_after_and_the_ratelimit_fields(plane: Harness) -> None:
    build(plane, "{per_key: {rate: 0.5, burst: 2}}")
    statuses(plane, "alice", 2)
    status, headers, body = send(plane, post(b"{}", "alice"))
    assert status == 429
    error = json.loads(body)
    assert error["error"] == "rate_limited" and "per_key" in error["detail"]
    assert headers[b"retry-after"] in (b"1", b"2")  # a token is back in 2 s at 0.5/s, less the time spent
    assert headers[b"ratelimit-policy"] == b'"per_key";q=2;w=4'
    assert headers[b"ratelimit"] == b'"per_key";r=0;t=' + headers[b"retry-after"]
    assert headers[b"connection"] == b"keep-alive"  # a whole request refused: the connection is kept


def test_the_group_limit_holds_one_group_and_not_the_others(plane: Harness) -> None:
    build(plane, f"{{per_group: {{rate: {SLOW}, burst: 2}}}}", groups=2)
    keys = [f"user-{n}" for n in range(40)]
    in_g0 = [k for k in keys if owner_of(plane, k) == "g0"]
    in_g1 = [k for k in keys if owner_of(plane, k) == "g1"]
    assert [send(plane, post(b"{}", k))[0] for k in in_g0[:3]] == [200, 200, 429]
    assert [send(plane, post(b"{}", k))[0] for k in in_g1[:2]] == [200, 200]
    # A read naming a user counts for its owner group, wherever it is served.
    assert send(plane, read(in_g0[3]))[0] == 429
    assert send(plane, read())[0] == 200  # a read with no key counts for no group


def test_the_global_limit_counts_every_request(plane: Harness) -> None:
    build(plane, f"{{global: {{rate: {SLOW}, burst: 2}}}}")
    assert [send(plane, r)[0] for r in (read(), post(b"{}", "alice"), read("bob"), read())] == [
        200,
        200,
        429,
        429,
    ]
    assert plane.metrics.rate_limits == {"global": 2}


def test_a_refused_request_gives_back_the_tokens_it_took(plane: Harness) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 1}}, global: {{rate: {SLOW}, burst: 5}}}}")
    assert statuses(plane, "alice", 3) == [200, 429, 429]  # per_key refused twice: global gave back
    assert [send(plane, post(b"{}", f"u{n}"))[0] for n in range(5)] == [200, 200, 200, 200, 429]


def test_requests_refused_for_another_reason_take_no_token(plane: Harness) -> None:
    build(plane, f"{{global: {{rate: {SLOW}, burst: 1}}}}")
    assert send(plane, b"POST /w HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")[0] == 400  # no key
    assert send(plane, read())[0] == 200


def test_unchanged_limits_keep_their_tokens_across_topologies_and_changed_ones_start_full(
    plane: Harness,
) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 1}}}}")
    assert statuses(plane, "alice", 1) == [200]
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 1}}}}")  # a new snapshot, the same limits
    assert statuses(plane, "alice", 1) == [429]
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 2}}}}")
    assert statuses(plane, "alice", 3) == [200, 200, 429]


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    limit = Limit("per_key", BucketConfig(rate=2, burst=3))
    bucket = limit.new_bucket()
    assert [limit.take(bucket, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take(bucket, 100.0) == pytest.approx(0.5)  # one token is back in 1/rate s
    assert limit.take(bucket, 100.5) == 0.0
    assert limit.take(bucket, 200.0) == 0.0  # long idle: full again, not more than burst
    assert bucket.tokens == pytest.approx(2.0)


def test_a_take_stamped_before_the_last_one_adds_and_removes_nothing_but_its_token() -> None:
    limit = Limit("global", BucketConfig(rate=100, burst=10))
    bucket = limit.new_bucket()
    assert limit.take(bucket, 50.0) == 0.0
    assert limit.take(bucket, 49.6) == 0.0  # (a head that began 0.4 s before the last take)
    assert bucket.tokens == pytest.approx(8.0) and bucket.stamp == 50.0


def test_with_workers_each_takes_its_share_of_a_limit() -> None:
    limit = Limit("global", BucketConfig(rate=10, burst=20), share=4)
    assert (limit.rate, limit.burst) == (2.5, 5.0)
    assert Limit("per_key", BucketConfig(rate=1, burst=2), share=4).burst == 1.0  # never below one


def test_the_per_key_buckets_are_bounded_and_a_hot_key_keeps_its_bucket() -> None:
    limit = Limit("per_key", BucketConfig(rate=1, burst=5))
    buckets = KeyBuckets(max_keys=100)
    hot = buckets.get(b"hot", limit, 0.0)
    for n in range(10_000):
        buckets.get(b"flood-%d" % n, limit, 0.0)
        assert len(buckets) <= 100
        if n % 10 == 0:
            assert buckets.get(b"hot", limit, 0.0) is hot


def test_a_limiter_without_limits_is_not_active() -> None:
    from gateway.observability.metrics import Metrics

    limiter = RateLimiter(Metrics())
    limiter.on_topology(
        TopologyBuilder().build(
            parse_shard_config('version: 1\ngroups:\n  - {name: g, endpoints: ["127.0.0.1:1"]}\n')
        )
    )
    assert not limiter.active and limiter.check("g", b"k", 0.0) is None
    assert isinstance(Bucket(1.0, 0.0).tokens, float)


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def test_with_redis_the_per_key_bucket_is_redis_s(plane: Harness, redis: RedisServer) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 3}}, redis_url: '{redis.url}', redis_timeout: 1}}")
    assert statuses(plane, "alice", 2) == [200, 200]
    assert redis.command("EXISTS", "shardgate:ratelimit:alice") == b":1\r\n"
    # Another data plane (another worker or replica: its own local buckets) takes from the same
    # bucket: one token left for both.
    other = ProxyContext(plane.loop, plane.holder, plane.metrics, Limits())
    client, transport = ClientConnection(other), FakeTransport(plane.loop)
    transport.protocol = client
    client.connection_made(transport)  # type: ignore[arg-type]
    plane.feed(client, [post(b"{}", "alice"), post(b"{}", "alice")])
    plane.wait_for(lambda: len(responses_in(bytes(transport.written))) == 2)
    # (Pipelined, both ask Redis at once: which one gets the token is Redis's order.)
    assert sorted(r[0] for r in responses_in(bytes(transport.written))) == [200, 429]
    assert statuses(plane, "alice", 1) == [429]
    redis.command("DEL", "shardgate:ratelimit:alice")
    assert statuses(plane, "alice", 1) == [200]  # Redis's bucket is the one that decides
    assert plane.metrics.rate_limit_fallbacks == {}
    transport.abort()
    plane.run(other.stop())


def test_a_429_from_redis_says_the_limit_as_configured(plane: Harness, redis: RedisServer) -> None:
    build(plane, f"{{per_key: {{rate: 0.5, burst: 1}}, redis_url: '{redis.url}', redis_timeout: 1}}")
    statuses(plane, "alice", 1)
    status, headers, _ = send(plane, post(b"{}", "alice"))
    assert status == 429
    assert headers[b"ratelimit-policy"] == b'"per_key";q=1;w=2'
    assert headers[b"ratelimit"] == b'"per_key";r=0;t=' + headers[b"retry-after"]


def test_when_redis_is_gone_the_local_buckets_decide(plane: Harness, redis: RedisServer) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 2}}, redis_url: '{redis.url}', redis_timeout: 0.2}}")
    assert statuses(plane, "alice", 1) == [200]
    redis.kill()
    # Fail open: every request is answered, by the local bucket (2 tokens, its own count).
    assert statuses(plane, "alice", 3) == [200, 200, 429]
    fallbacks = plane.metrics.rate_limit_fallbacks
    assert fallbacks.get("error", 0) + fallbacks.get("timeout", 0) == 1  # then Redis is left alone
    assert fallbacks.get("unavailable") == 2


def test_a_client_gone_while_redis_answers_is_forgotten(plane: Harness, redis: RedisServer) -> None:
    build(plane, f"{{per_key: {{rate: {SLOW}, burst: 3}}, redis_url: '{redis.url}', redis_timeout: 1}}")
    client, transport = plane.connect()
    plane.feed(client, [post(b"{}", "alice")])
    transport.abort()  # before Redis answered
    plane.wait_for(lambda: not plane.ctx.redis_limits._asks)
    assert transport.written == bytearray() or responses_in(bytes(transport.written)) == []
    assert statuses(plane, "bob", 1) == [200]
