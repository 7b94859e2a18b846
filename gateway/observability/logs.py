"""Structured logs: one JSON object per line, carrying request, trace, group, pod and epoch.

The access log is a policy, not a stream of every request: by default only failed (5xx) and
slow requests are logged, so a healthy gateway at 30k requests/s writes nothing per request.
``SHARDGATE_ACCESS_LOG``: ``errors`` (default), ``all``, ``off``, or a sampling ratio such as
``0.01`` (that share of all requests, plus every failed or slow one).
``SHARDGATE_SLOW_REQUEST_SECONDS`` (default 1) sets what "slow" means.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO

from gateway.config import ConfigError

# LogRecord attributes that are ours (passed with ``extra=``) and belong in the JSON object.
CONTEXT_FIELDS = (
    "request_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "status",
    "kind",
    "group",
    "pod",
    "epoch",
    "duration_ms",
    "client",
    "error",
    "worker",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Root logging for a gateway process (workers pass stderr: their stdout is the IPC pipe)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_format(env: Mapping[str, str]) -> str:
    fmt = (env.get("SHARDGATE_LOG_FORMAT") or "json").strip().lower()
    if fmt not in ("json", "text"):
        raise ConfigError([f"SHARDGATE_LOG_FORMAT: {fmt!r} is not json or text"])
    return fmt


class AccessLog:
    """Decides, per finished request, whether it is logged; cheap when the answer is no."""

    __slots__ = ("enabled", "everything", "logger", "ratio", "sampling", "slow")

    def __init__(self, mode: str = "errors", slow_seconds: float = 1.0) -> None:
        self.logger = logging.getLogger("shardgate.access")
        self.slow = slow_seconds
        self.everything = mode == "all"
        self.enabled = mode != "off"
        self.ratio = 0.0
        if mode not in ("all", "off", "errors"):
            self.ratio = float(mode)
        # Whether a fast request that succeeded may be logged at all (the hot path asks this).
        self.sampling = self.everything or self.ratio > 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AccessLog:
        mode = (env.get("SHARDGATE_ACCESS_LOG") or "errors").strip().lower()
        if mode not in ("all", "off", "errors"):
            try:
                ratio = float(mode)
            except ValueError:
                raise ConfigError(
                    [f"SHARDGATE_ACCESS_LOG: {mode!r} is not all, errors, off or a ratio"]
                ) from None
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError([f"SHARDGATE_ACCESS_LOG: ratio {ratio} is not between 0 and 1"])
        raw_slow = env.get("SHARDGATE_SLOW_REQUEST_SECONDS") or "1"
        try:
            slow = float(raw_slow)
        except ValueError:
            raise ConfigError([f"SHARDGATE_SLOW_REQUEST_SECONDS: {raw_slow!r} is not a number"]) from None
        return cls(mode, slow)

    def wants(self, status: int, seconds: float) -> bool:
        if not self.enabled:
            return False
        if self.everything or status >= 500 or seconds >= self.slow:
            return True
        return self.ratio > 0.0 and random.random() < self.ratio

    def log(self, fields: dict[str, object]) -> None:
        status = fields.get("status", 0)
        level = logging.WARNING if isinstance(status, int) and status >= 500 else logging.INFO
        self.logger.log(level, "%s %s %s", fields.get("method"), fields.get("path"), status, extra=fields)
