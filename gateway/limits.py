"""The data plane's limits and timeouts, as it reads them on the hot path.

A plain frozen dataclass with slots: every read is an attribute lookup, nothing more. The
defaults written here are the ones of the process settings too (``gateway.settings`` takes them
from this class), so ``Limits()`` is what a gateway runs with when no SHARDGATE_* variable says
otherwise; ``Settings.limits`` builds the one a gateway runs with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits (bytes) and timeouts (seconds) of one data plane."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 2.0
    upstream_header_timeout: float = 30.0  # SHARDGATE_UPSTREAM_TIMEOUT
    client_header_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    # Below the keep-alive timeout of common app servers (uvicorn 5 s, Node 5 s), so that the
    # gateway, not the upstream, usually closes an idle connection.
    upstream_idle_timeout: float = 4.0
    max_idle_per_pod: int = 64
