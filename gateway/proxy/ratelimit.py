"""Rate limits: token buckets global, per group and per shard key (docs/contract.md "Rate limits").

A request takes one token from each bucket that applies to it: the global one, its key's owner
group's (a request with a key: a write, or a read naming a user), its key's. When one of them
is empty the request is answered ``429 rate_limited`` with ``Retry-After`` and the
``RateLimit-Policy`` / ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers), and the
tokens it took from the buckets before are given back: a refused request costs nothing.

The per-key limit is what protects an owner group from one hot user: its writes cannot spill to
another group, so without it one user could keep a whole group busy.

The buckets are this process's own. With ``--workers W`` each worker keeps buckets of
``rate / W`` and ``burst / W`` (at least 1), so that a replica as a whole lets through no more
than the config says. With ``limits.redis_url`` the per-key buckets live in Redis instead,
exact across workers and replicas (``gateway.proxy.redis_limits``); the local per-key bucket
then decides only while Redis does not answer (fail open).

The per-key buckets are bounded (``max_keys``): kept in two generations, a key not asked for
during a whole generation is forgotten, which is the same as a full bucket. A flood of distinct
keys cannot grow them without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gateway.config import BucketConfig, RateLimitsConfig
from gateway.observability.metrics import Metrics
from gateway.router import Refusal
from gateway.topology import Topology

GLOBAL, PER_GROUP, PER_KEY = "global", "per_group", "per_key"  # the policies' names, as configured
BUCKET_FIELDS = {GLOBAL: "global_", PER_GROUP: "per_group", PER_KEY: "per_key"}  # (RateLimitsConfig)


class Bucket:
    """The tokens left in one bucket, as of ``stamp`` (loop time)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Limit:
    """One configured limit: its rate (tokens per second) and burst (the bucket's size)."""

    __slots__ = ("burst", "name", "quota", "rate", "window")

    def __init__(self, name: str, settings: BucketConfig, share: int = 1) -> None:
        self.name = name
        self.rate = settings.rate / share
        self.burst = max(1.0, float(settings.capacity // share))
        # The window of the RateLimit-Policy field: the time an empty bucket takes to fill.
        self.window = max(1, math.ceil(self.burst / self.rate))
        # The quota of the RateLimit-Policy field: what a window lets through at the rate, or
        # the burst if more (a bucket smaller than a second of its rate says its rate).
        self.quota = max(self.burst, math.floor(self.rate * self.window))

    def new_bucket(self) -> Bucket:
        return Bucket(self.burst, 0.0)  # (full: a take adds the time since 0 and caps at burst)

    def take(self, bucket: Bucket, now: float) -> float:
        """Take a token from ``bucket``: 0.0 if it had one, else the seconds until it will."""
        tokens = bucket.tokens
        if now > bucket.stamp:  # (a request whose head began before the last take adds nothing)
            tokens += (now - bucket.stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return 0.0
        bucket.tokens = tokens
        return (1.0 - tokens) / self.rate

    def give_back(self, bucket: Bucket) -> None:
        """The token a request took, returned: a later bucket refused the request."""
        bucket.tokens = min(self.burst, bucket.tokens + 1.0)

    def refusal(self, bucket: Bucket, wait: float) -> Refusal:
        """The 429 for a request this limit refused, ``wait`` seconds before a token is back."""
        seconds = max(1, math.ceil(wait))
        headers = (
            b'RateLimit-Policy: "%s";q=%d;w=%d' % (self.name.encode(), self.quota, self.window),
            b'RateLimit: "%s";r=%d;t=%d' % (self.name.encode(), int(bucket.tokens), seconds),
        )
        detail = f"rate limit {self.name} exceeded ({self.rate:g} requests per second, burst {self.burst:g})"
        return Refusal(429, "rate_limited", detail, seconds, headers=headers)

    def same_as(self, other: Limit | None) -> bool:
        return other is not None and (self.rate, self.burst) == (other.rate, other.burst)


class KeyBuckets:
    """The per-key buckets, at most ``max_keys``: a young and an old generation of half each.
    A key found in the old one moves to the young one; when the young one is full it becomes
    the old one, and the old one's keys (not asked for during a whole generation) are dropped."""

    __slots__ = ("_generation", "_old", "_young")

    def __init__(self, max_keys: int) -> None:
        self._generation = max(1, max_keys // 2)
        self._young: dict[bytes, Bucket] = {}
        self._old: dict[bytes, Bucket] = {}

    def get(self, key: bytes, limit: Limit, now: float) -> Bucket:
        bucket = self._young.get(key)
        if bucket is None:
            bucket = self._old.pop(key, None) or limit.new_bucket()
            if len(self._young) >= self._generation:
                self._old, self._young = self._young, {}
            self._young[key] = bucket
        return bucket

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


# What ``RateLimiter.check`` answers when the per-key bucket is in Redis: ask it (``ask_remote``).
ASK_REMOTE = Refusal(429, "rate_limited", "(the per-key bucket is asked in Redis)")


class RateLimiter:
    """The buckets of one data-plane process, rebuilt when the config's ``limits`` change
    (kept, with their tokens, across topologies that leave them as they were)."""

    def __init__(self, metrics: Metrics, share: int = 1) -> None:
        self._metrics = metrics
        self._share = share  # --workers W: each worker takes 1/W of every local limit
        self.active = False  # any limit configured: read by the client on every request
        self.redis_wanted = False  # the config names a Redis server for the per-key buckets
        self.remote: Callable[[Any, str | None, bytes], None] | None = None  # the per-key buckets in Redis
        self._settings: RateLimitsConfig | None = None
        self._global: Limit | None = None
        self._kept_global: Limit | None = None
        self._global_bucket = Bucket(0.0, 0.0)
        self._per_group: Limit | None = None
        self._group_buckets: dict[str, Bucket] = {}
        self._per_key: Limit | None = None
        self.per_key_exact: Limit | None = None  # the per-key limit as Redis keeps it (not shared)
        self._max_keys = 0
        self._key_buckets = KeyBuckets(2)

    def on_topology(self, topology: Topology) -> None:
        settings = topology.config.limits
        if settings == self._settings:
            return
        self._settings = settings
        self.active = settings is not None
        self.redis_wanted = settings is not None and settings.redis_url is not None
        self._global = self._kept(GLOBAL, settings, self._global)
        if self._global is not None and self._global is not self._kept_global:
            self._global_bucket = self._global.new_bucket()
        self._kept_global = self._global
        per_group = self._kept(PER_GROUP, settings, self._per_group)
        if per_group is not self._per_group:
            self._group_buckets = {}
        self._per_group = per_group
        per_key = self._kept(PER_KEY, settings, self._per_key)
        if per_key is not self._per_key or settings is None or settings.max_keys != self._max_keys:
            self._max_keys = settings.max_keys if settings is not None else 0
            self._key_buckets = KeyBuckets(self._max_keys)
        self._per_key = per_key
        self.per_key_exact = self._limit(PER_KEY, settings, share=1)

    def _kept(self, name: str, settings: RateLimitsConfig | None, current: Limit | None) -> Limit | None:
        """The limit ``name`` of ``settings``: ``current`` itself if it is the same (its buckets
        keep their tokens), or None."""
        limit = self._limit(name, settings, self._share)
        return current if limit is not None and limit.same_as(current) else limit

    @staticmethod
    def _limit(name: str, settings: RateLimitsConfig | None, share: int) -> Limit | None:
        bucket = getattr(settings, BUCKET_FIELDS[name]) if settings is not None else None
        return Limit(name, bucket, share) if bucket is not None else None

    @property
    def settings(self) -> RateLimitsConfig | None:
        return self._settings

    def keys_kept(self) -> int:
        return len(self._key_buckets)

    # -- per request ---------------------------------------------------------------------------

    def check(self, group: str | None, key: bytes | None, now: float) -> Refusal | None:
        """Take a token from each bucket that applies: None if every one had one, else the 429
        of the first that had none (the tokens taken before it given back). ``ASK_REMOTE``: the
        global and group tokens are taken, the key's bucket is to be asked in Redis."""
        limit = self._global
        if limit is not None:
            wait = limit.take(self._global_bucket, now)
            if wait:
                return self._refused(limit, self._global_bucket, wait)
        if group is not None and self._per_group is not None:
            refusal = self._check_group(group, now)
            if refusal is not None:
                return refusal
        if key is not None and self._per_key is not None:
            if self.remote is not None:
                return ASK_REMOTE
            if self.redis_wanted:
                self._metrics.rate_limit_fallback("unavailable")  # Redis is left alone a while
            return self.check_key_locally(group, key, now)
        return None

    def _check_group(self, group: str, now: float) -> Refusal | None:
        limit = self._per_group
        assert limit is not None
        bucket = self._group_buckets.get(group)
        if bucket is None:
            bucket = self._group_buckets[group] = limit.new_bucket()
        wait = limit.take(bucket, now)
        if not wait:
            return None
        self._give_back_global()
        return self._refused(limit, bucket, wait)

    def check_key_locally(self, group: str | None, key: bytes, now: float) -> Refusal | None:
        """The key's local bucket decides (no Redis, or Redis did not answer)."""
        limit = self._per_key
        if limit is None:
            return None
        bucket = self._key_buckets.get(key, limit, now)
        wait = limit.take(bucket, now)
        if not wait:
            return None
        self.give_back(group)
        return self._refused(limit, bucket, wait)

    def key_refused_remotely(self, group: str | None, remaining: int, wait: float) -> Refusal:
        """Redis said the key's bucket is empty: the 429, and the other tokens given back."""
        limit = self.per_key_exact
        assert limit is not None
        self.give_back(group)
        return self._refused(limit, Bucket(float(remaining), 0.0), wait)

    def give_back(self, group: str | None) -> None:
        """Return the global and group tokens a request took (a later bucket refused it)."""
        self._give_back_global()
        if group is not None and self._per_group is not None:
            bucket = self._group_buckets.get(group)
            if bucket is not None:
                self._per_group.give_back(bucket)

    def _give_back_global(self) -> None:
        if self._global is not None:
            self._global.give_back(self._global_bucket)

    def _refused(self, limit: Limit, bucket: Bucket, wait: float) -> Refusal:
        self._metrics.rate_limited(limit.name)
        return limit.refusal(bucket, wait)
