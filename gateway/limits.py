"""The data plane's limits and timeouts, as it reads them on the hot path.

A plain frozen dataclass with slots: every read is an attribute lookup, nothing more. Values
(and their defaults) come from the process settings (``gateway.settings.Settings.limits``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits (bytes) and timeouts (seconds) of one data plane."""

    max_header_bytes: int
    max_body_bytes: int
    connect_timeout: float
    upstream_header_timeout: float
    client_header_timeout: float
    client_idle_timeout: float
    upstream_idle_timeout: float
    max_idle_per_pod: int
