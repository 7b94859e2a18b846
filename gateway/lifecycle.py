"""The process lifecycle shared by the single-process gateway and the --workers supervisor.

DESIGN.md "Lifecycle": on SIGTERM (or SIGINT) readiness turns 503 at once, the process keeps
serving for the drain delay, then stops (stop accepting, finish in-flight requests up to the
grace timeout, close the rest) and exits 0. A second signal exits at once. SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from gateway.config import ConfigError

log = logging.getLogger("shardgate")


class Servable(Protocol):
    async def start(self) -> None: ...  # raises ConfigError or OSError, having cleaned up
    def begin_drain(self) -> None: ...
    async def stop(self) -> None: ...
    def reload_config(self) -> None: ...
    def exit_now(self) -> None: ...  # the second signal: release what must not outlive us


async def run_until_stopped(process: Servable, drain_delay: float) -> int:
    try:
        await process.start()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_stop_signal(signame: str) -> None:
        if stop_requested.is_set():
            log.warning("second %s: exiting at once", signame)
            process.exit_now()
            raise SystemExit(1)
        log.info("%s: draining for %.1fs, then stopping", signame, drain_delay)
        process.begin_drain()
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGHUP, process.reload_config)

    await stop_requested.wait()
    await asyncio.sleep(drain_delay)
    await process.stop()
    log.info("stopped")
    return 0
