"""gateway/tasks.py: waiting and stopping without asyncio.wait_for, and start-up tasks that
say when they fail."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.tasks import cancel_and_wait, log_if_it_fails, sleep_or_wake


def test_sleep_or_wake_returns_on_the_event_or_the_timeout() -> None:
    async def scenario() -> tuple[bool, bool]:
        event = asyncio.Event()
        await sleep_or_wake(event, 0.01)  # the timeout
        woken = asyncio.get_running_loop().call_soon(event.set)
        await sleep_or_wake(event, None)  # the event (no timeout: it would hang otherwise)
        woken.cancel()
        return event.is_set(), not asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(scenario()) == (True, True)  # and no waiter task is left behind


def test_cancel_and_wait_ends_a_task_that_swallows_one_cancellation() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # swallowed once, as 3.11's wait_for can
        await asyncio.sleep(60)

    async def scenario() -> bool:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        return task.cancelled()

    assert asyncio.run(scenario())


def test_a_failing_start_up_task_is_logged_when_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("shardgate.test-tasks")

    async def failing() -> None:
        raise RuntimeError("no credentials")

    async def scenario() -> None:
        task = log_if_it_fails(asyncio.create_task(failing()), "starting the thing", logger)
        await asyncio.wait({task})
        cancelled = log_if_it_fails(asyncio.create_task(asyncio.sleep(60)), "sleeping", logger)
        await cancel_and_wait(cancelled)

    with caplog.at_level(logging.ERROR, logger="shardgate.test-tasks"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "shardgate.test-tasks"]
    assert messages == ["starting the thing failed: no credentials"]  # a cancellation is not a failure
