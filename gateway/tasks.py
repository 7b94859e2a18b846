"""Waiting and stopping without ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation
that arrives just as the awaited thing completes (fixed in 3.12), and a background loop whose
``stop()`` cancellation is swallowed runs on for ever."""

from __future__ import annotations

import asyncio
import logging
from typing import Any


async def sleep_or_wake(event: asyncio.Event, timeout: float | None) -> None:
    """Return once ``event`` is set or ``timeout`` seconds passed (None: no timeout)."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended (cancelling again should it go on)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        task.exception()  # retrieved: an ending error was logged by the task itself


def log_if_it_fails(task: asyncio.Task[Any], what: str, logger: logging.Logger) -> asyncio.Task[Any]:
    """Log ``task``'s exception the moment it ends with one (a start-up task nobody awaits until
    the process stops would otherwise fail in silence)."""

    def report(done: asyncio.Task[Any]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            logger.error("%s failed: %s", what, exc, exc_info=exc)

    task.add_done_callback(report)
    return task
