"""Per-key rate limits kept in Redis: exact across workers and replicas (``limits.redis_url``).

Each request with a key runs one Lua script on the Redis server (atomic: Redis runs a script
alone), which refills the key's bucket by the server's own clock (``TIME``: the replicas' clocks
do not matter) and takes a token or says how long until one is back. The bucket expires once it
would be full again, so Redis keeps only the keys in use.

Redis is not on the path to an answer: a script not answered within ``limits.redis_timeout``
(or any Redis error) lets the process's own per-key bucket decide, counted in
``shardgate_rate_limit_fallbacks_total``, and Redis is left alone for ``RETRY_AFTER`` seconds
(its requests decided locally, at once) before it is asked again: fail open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.observability.metrics import Metrics
from gateway.proxy.ratelimit import RateLimiter
from gateway.topology import Topology

if TYPE_CHECKING:  # redis is imported only when a config names a Redis server
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from gateway.proxy.exchange import Exchange
    from gateway.router import Refusal

log = logging.getLogger("shardgate.ratelimit")

RETRY_AFTER = 1.0  # seconds Redis is left alone after it failed to answer
KEY_PREFIX = b"shardgate:ratelimit:"
MAX_CONNECTIONS = 32  # per process; a request waits for a free one within the timeout

# KEYS[1]: the key's bucket; ARGV: rate (tokens/s), burst. Returns {taken (1/0), tokens left
# (floored), seconds until a token is back (as a string: a Lua number would be truncated)}.
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
if now > stamp then tokens = math.min(burst, tokens + (now - stamp) * rate) end
local taken, wait = 0, (1 - tokens) / rate
if tokens >= 1 then
  tokens = tokens - 1
  taken, wait = 1, 0
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {taken, math.floor(tokens), string.format('%.6f', wait)}
"""


class RedisLimits:
    """The Redis server of the config in force, asked for each keyed request's token."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limiter: RateLimiter, metrics: Metrics) -> None:
        self._loop = loop
        self._limiter = limiter
        self._metrics = metrics
        self._url: str | None = None
        self._timeout = 0.05
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._asks: set[asyncio.Task[None]] = set()

    def on_topology(self, topology: Topology) -> None:
        """Connect to the config's Redis server (after the limiter took the new limits)."""
        settings = topology.config.limits
        url = settings.redis_url if settings is not None else None
        if settings is not None:
            self._timeout = settings.redis_timeout
        if url != self._url:
            self._close()
            self._url = url
            if url is not None:
                self._open(url)
        self._limiter.remote = self.ask if self._client is not None and self._retry is None else None

    def _open(self, url: str) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis

        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
        )
        self._client = Redis(connection_pool=pool)
        self._script = self._client.register_script(TOKEN_BUCKET)
        log.info("per-key rate limits kept in Redis at %s", url)

    def _close(self) -> None:
        client, self._client, self._script = self._client, None, None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if client is not None:
            task = self._loop.create_task(client.aclose(close_connection_pool=True))
            self._asks.add(task)
            task.add_done_callback(self._asks.discard)

    async def stop(self) -> None:
        self._close()
        self._limiter.remote = None
        if self._asks:
            await asyncio.gather(*self._asks, return_exceptions=True)

    # -- per request ---------------------------------------------------------------------------

    def ask(self, exchange: Exchange, group: str | None, key: bytes) -> None:
        """Take a token from ``key``'s bucket in Redis; the exchange waits for the answer."""
        task = self._loop.create_task(self._take(exchange, group, key))
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)

    async def _take(self, exchange: Exchange, group: str | None, key: bytes) -> None:
        limit, script = self._limiter.per_key_exact, self._script
        if limit is None or script is None:  # the limit went away while the request was read
            self._tell(exchange, None)
            return
        try:
            async with asyncio.timeout(self._timeout):
                taken, remaining, wait = await script(keys=[KEY_PREFIX + key], args=[limit.rate, limit.burst])
        except Exception as exc:  # any failure of Redis: the local bucket decides (fail open)
            self._tell(exchange, self._decide_locally(group, key, exc))
            return
        refused = not taken
        self._tell(
            exchange,
            self._limiter.key_refused_remotely(group, int(remaining), float(wait)) if refused else None,
        )

    @staticmethod
    def _tell(exchange: Exchange, refusal: Refusal | None) -> None:
        """Hand the answer to the exchange, which goes on from here (in this task, outside the
        connection's own error handling: a bug of ours is answered 500, never left hanging)."""
        try:
            exchange.limit_decided(refusal)
        except Exception as exc:  # a bug of ours: logged with its traceback, and answered 500
            log.exception("internal error after a rate limit's answer")
            exchange.client._internal_error(exc)  # type: ignore[attr-defined]

    def _decide_locally(self, group: str | None, key: bytes, exc: BaseException) -> Refusal | None:
        reason = "timeout" if isinstance(exc, TimeoutError) else "error"
        self._metrics.rate_limit_fallback(reason)
        if self._retry is None and self._client is not None:
            log.warning(
                "Redis at %s did not answer (%s): per-key limits are local for %.0fs",
                self._url,
                exc.__class__.__name__ if reason == "timeout" else exc,
                RETRY_AFTER,
            )
            self._limiter.remote = None
            self._retry = self._loop.call_later(RETRY_AFTER, self._try_again)
        return self._limiter.check_key_locally(group, key, self._loop.time())

    def _try_again(self) -> None:
        self._retry = None
        if self._client is not None:
            self._limiter.remote = self.ask
