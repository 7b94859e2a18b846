"""Structured logs: one JSON object per line, carrying request, trace, group, pod and epoch.

The access log is a policy, not a stream of every request: by default only failed (5xx) and
slow requests are logged, so a healthy gateway at 30k requests/s writes nothing per request.
The mode (``SHARDGATE_ACCESS_LOG``: ``errors``, ``all``, ``off``, or a sampling ratio such as
``0.01``: that share of all requests, plus every failed or slow one) and what "slow" means
(``SHARDGATE_SLOW_REQUEST_SECONDS``) are process settings (``gateway.settings``).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from datetime import UTC, datetime
from typing import IO

from gateway.settings import default_of

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


class AccessLog:
    """Decides, per finished request, whether it is logged; cheap when the answer is no."""

    __slots__ = ("enabled", "everything", "logger", "ratio", "sampling", "slow")

    def __init__(
        self,
        mode: str = default_of("access_log"),
        slow_seconds: float = default_of("slow_request_seconds"),
    ) -> None:
        """``mode`` and ``slow_seconds`` as the settings validated them (``access_log``,
        ``slow_request_seconds``); the defaults are theirs too."""
        self.logger = logging.getLogger("shardgate.access")
        self.slow = slow_seconds
        self.everything = mode == "all"
        self.enabled = mode != "off"
        self.ratio = 0.0
        if mode not in ("all", "off", "errors"):
            self.ratio = float(mode)
        # Whether a fast request that succeeded may be logged at all (the hot path asks this).
        self.sampling = self.everything or self.ratio > 0.0

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
