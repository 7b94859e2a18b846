"""Asking a backend pod's fence what it holds: ``GET /.well-known/shardgate/fence?generation=F``
(which also makes the fence read the state at once if it holds less than F).

Three outcomes: the fence's answer (a ``Report``: its generation and its writes in flight for
keys moving under it); ``UNFENCED``, an answer that is not a fence's (the pod runs no fence: it
refuses nothing, so there is nothing to wait for, but it is logged once and listed); or None,
no answer (refused, reset, timed out, or an error status): the barrier then waits for the pod
as for a silent one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any, TypeGuard

import aiohttp

from gateway.handoff import Report

__all__ = ["FENCE_PATH", "UNFENCED", "PodProber", "Probe", "Unfenced"]

log = logging.getLogger("shardgate.coordinator")

FENCE_PATH = "/.well-known/shardgate/fence"  # gateway.fence.STATE_PATH (not imported: the fence
# module is the backends' library)
FENCE_HEADER = "X-Shard-Fence"


class Unfenced(enum.Enum):
    UNFENCED = "unfenced"


UNFENCED = Unfenced.UNFENCED
Probe = Report | Unfenced | None


def fence_report(status: int, headers: Any, body: bytes) -> Probe:
    """What one answer of the fence endpoint says (see the module docstring)."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("fence") == 1:
        if status != 200:
            return None
        generation, moving = document.get("generation"), document.get("moving_writes_in_flight")
        if not (generation is None or _count(generation)) or not _count(moving):
            return None  # a fence's answer we cannot read: as good as none
        return Report(generation, moving)
    if (200 <= status < 300 or status in (404, 405)) and headers.get(FENCE_HEADER) is None:
        return UNFENCED  # the application itself answers the path: no fence runs in front of it
    # Failing, overloaded, redirected, or an auth wall in the way (a fence may run behind it): no
    # answer, not "no fence"; the barrier waits for it as for a silent pod.
    return None


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PodProber:
    """One HTTP client (keep-alive) for every pod the barrier asks."""

    def __init__(self, timeout: float = 1.0, concurrency: int = 64) -> None:
        self.timeout = timeout
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(concurrency)
        self._warned: set[str] = set()

    async def start(self) -> None:
        if self._session is None:
            self._limit = asyncio.Semaphore(self._concurrency)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=2),
                headers={"Accept": "application/json", "User-Agent": "shardgate-coordinator"},
            )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def probe(self, address: str, generation: int) -> Probe:
        """Ask the pod at ``address`` ("host:port") for its fence state, naming ``generation``."""
        session = self._session
        if session is None:
            raise RuntimeError("the prober is not started")
        url = f"http://{address}{FENCE_PATH}?generation={generation}"
        try:
            async with self._limit, session.get(url, allow_redirects=False) as response:
                body = await response.read()
                result = fence_report(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        if result is UNFENCED and address not in self._warned:
            self._warned.add(address)
            log.warning(
                "pod %s answers no fence at %s (%d): counted done in hand-offs; its writes are not fenced",
                address,
                FENCE_PATH,
                response.status,
            )
        return result
