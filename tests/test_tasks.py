"""sse_handler.tasks.until_done: a coroutine awaited step by step, with a
callback just before it first waits."""

from __future__ import annotations

import asyncio

import pytest

from sse_handler.tasks import until_done


async def test_a_coroutine_that_never_waits_never_triggers_the_callback() -> None:
    calls: list[str] = []

    async def quick() -> int:
        return 7

    assert await until_done(quick(), lambda: calls.append("wait")) == 7
    assert calls == []


async def test_the_callback_runs_once_before_the_first_wait() -> None:
    calls: list[str] = []

    async def slow() -> str:
        calls.append("start")
        await asyncio.sleep(0)
        calls.append("between")
        await asyncio.sleep(0.01)
        return "done"

    assert await until_done(slow(), lambda: calls.append("wait")) == "done"
    assert calls == ["start", "wait", "between"]


async def test_another_awaitable_triggers_the_callback_at_once() -> None:
    calls: list[str] = []
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    future.set_result(3)
    assert await until_done(future, lambda: calls.append("wait")) == 3
    assert calls == ["wait"]


async def test_errors_and_cancellation_reach_through() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await until_done(fails(), lambda: None)

    cleaned: list[str] = []
    task = asyncio.ensure_future(until_done(_waits_long(cleaned), lambda: None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"]


async def test_a_callback_that_raises_closes_the_coroutine() -> None:
    cleaned: list[str] = []

    def broken() -> None:
        raise RuntimeError("callback")

    with pytest.raises(RuntimeError, match="callback"):
        await until_done(_waits_long(cleaned), broken)
    assert cleaned == ["finally"]


async def _waits_long(cleaned: list[str]) -> None:
    """Waits a minute; says so in ``cleaned`` however it ends."""
    try:
        await asyncio.sleep(60)
    finally:
        cleaned.append("finally")
