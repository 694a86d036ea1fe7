"""sse_handler.tasks.until_done: a coroutine awaited step by step, with a
callback just before it first waits; start_soon and in_task: background
work that has no task until it waits; after_batch: what runs once a batch
of start_soon is through."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from support import wait_until

from sse_handler.tasks import after_batch, in_task, start_soon, until_done


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


_seen: contextvars.ContextVar[str] = contextvars.ContextVar("_seen", default="")


async def test_start_soon_runs_a_turns_coroutines_in_one_callback_without_tasks() -> None:
    ran: list[tuple[int, asyncio.Task[object] | None, str]] = []

    async def work(n: int) -> None:
        ran.append((n, asyncio.current_task(), _seen.get()))
        _seen.set(f"set by {n}")  # must not reach the next one

    for n in range(5):
        start_soon(work(n), f"work {n}")
    assert ran == []  # soon, not now
    await asyncio.sleep(0)
    assert ran == [(n, None, "") for n in range(5)]


async def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[object] = []

    async def work() -> None:
        steps.append(asyncio.current_task())
        steps.append(await future)
        steps.append(asyncio.current_task())

    token = _seen.set("the starter's")
    start_soon(work(), "waiting work")
    _seen.reset(token)
    await asyncio.sleep(0)
    assert steps == [None]
    future.set_result("woken")
    await wait_until(lambda: len(steps) == 3)
    assert steps[1] == "woken"
    assert isinstance(steps[2], asyncio.Task)


async def test_in_task_gives_a_task_to_code_that_needs_one() -> None:
    """asyncio.timeout() raises outside a task: after in_task() it works,
    and the context the coroutine was started in goes with it."""
    done: list[object] = []

    async def work() -> None:
        await in_task()
        async with asyncio.timeout(1):
            await asyncio.sleep(0)
        done.append(_seen.get())
        await in_task()  # in a task already: nothing happens
        done.append(asyncio.current_task())

    token = _seen.set("the starter's")
    start_soon(work(), "work needing a task")
    _seen.reset(token)
    await wait_until(lambda: len(done) == 2)
    assert done[0] == "the starter's"
    assert isinstance(done[1], asyncio.Task)


async def test_a_failure_is_logged_once_whether_or_not_it_had_waited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_at_once() -> None:
        raise RuntimeError("at once")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("later")

    with caplog.at_level(logging.ERROR, logger="sse_handler"):
        start_soon(fails_at_once(), "the quick one")
        start_soon(fails_later(), "the slow one")
        await wait_until(lambda: len(caplog.records) == 2)
        await asyncio.sleep(0.01)
    messages = sorted(record.getMessage() for record in caplog.records)
    assert messages == [
        "Uncaught exception in the quick one",
        "Uncaught exception in the slow one",
    ]


async def test_a_task_it_went_on_in_can_be_cancelled() -> None:
    cleaned: list[str] = []
    went_on_in: list[asyncio.Task[object] | None] = []

    async def work() -> None:
        await asyncio.sleep(0)
        went_on_in.append(asyncio.current_task())
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append("cleaned")

    start_soon(work(), "long work")
    await wait_until(lambda: len(went_on_in) == 1)
    task = went_on_in[0]
    assert task is not None
    task.cancel()
    await wait_until(lambda: cleaned == ["cleaned"])
    assert task.cancelled()


async def test_a_task_cancelled_before_its_first_step_closes_its_coroutine() -> None:
    """Cancelled before the task ran (a shutdown cancelling every task), the
    coroutine is closed at once: its cleanup runs, not at garbage collection."""
    cleaned: list[str] = []
    tasks_before = asyncio.all_tasks()

    async def work() -> None:
        try:
            await in_task()
            await asyncio.sleep(10)
        finally:
            cleaned.append("cleaned")

    start_soon(work(), "work")
    await asyncio.sleep(0)  # the batch ran: the task exists, not started yet
    (task,) = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
    task.cancel()
    await wait_until(lambda: task.done())
    assert cleaned == ["cleaned"]


def test_an_interrupt_in_a_batch_leaves_the_rest_for_the_next_run() -> None:
    ran: list[int] = []

    async def work(n: int) -> None:
        if n == 1:
            raise KeyboardInterrupt
        ran.append(n)

    seen_between: list[list[int]] = []
    _interrupted_then_run_again(work, lambda: seen_between.append(list(ran)))
    assert seen_between == [[0]]
    assert ran == [0, 2, 3]  # the loop ran again: so did the rest


def _interrupted_then_run_again(
    work: Callable[[int], Coroutine[Any, Any, None]], between: Callable[[], None] = lambda: None
) -> None:
    """``work(0)`` to ``work(3)`` started in one batch, on a loop of their own
    run until a KeyboardInterrupt reaches it, ``between()``, then run again."""

    async def start_and_wait() -> None:
        for n in range(4):
            start_soon(work(n), f"work {n}")
        await asyncio.sleep(0.01)

    loop = asyncio.new_event_loop()
    try:
        main = loop.create_task(start_and_wait())
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(main)
        between()
        loop.run_until_complete(main)
    finally:
        loop.close()


async def test_coroutines_of_one_batch_may_wait_on_the_same_future() -> None:
    """Each goes on in a task of its own once the future is done (the second
    one's await raised "await wasn't used with future": the future was still
    marked as waited on by the first, whose task had not taken it yet)."""
    shared: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    got: list[tuple[int, str]] = []

    async def work(n: int) -> None:
        got.append((n, await shared))

    for n in range(3):
        start_soon(work(n), f"work {n}")
    await asyncio.sleep(0)
    shared.set_result("done")
    await wait_until(lambda: len(got) == 3)
    assert sorted(got) == [(0, "done"), (1, "done"), (2, "done")]


async def test_after_batch_runs_once_the_whole_batch_is_through() -> None:
    """Called from a start_soon batch, the callbacks run in order once every
    coroutine of the batch has run as far as it goes; from tasks, soon, in
    one callback with the others of that turn of the loop."""
    order: list[str] = []
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work(n: int) -> None:
        order.append(f"work {n}")
        after_batch(lambda: order.append(f"after {n}"))
        if n < 2:
            await future  # goes on in a task, after the batch
            order.append(f"work {n}, in its task")
            after_batch(lambda: order.append(f"after {n}, in its task"))

    for n in range(3):
        start_soon(work(n), f"work {n}")
    await asyncio.sleep(0)
    assert order == ["work 0", "work 1", "work 2", "after 0", "after 1", "after 2"]
    future.set_result(None)  # wakes both tasks in one turn
    await wait_until(lambda: len(order) == 10)
    assert order[6:] == [
        "work 0, in its task",
        "work 1, in its task",
        "after 0, in its task",
        "after 1, in its task",
    ]
    order.clear()
    after_batch(lambda: order.append("from a test's task"))
    assert order == []  # soon, not now
    await asyncio.sleep(0)
    assert order == ["from a test's task"]


async def test_an_after_batch_callback_that_raises_is_logged_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("after")

    async def work(n: int) -> None:
        after_batch(broken if n == 0 else lambda: ran.append(n))

    for n in range(3):
        start_soon(work(n), f"work {n}")
    with caplog.at_level(logging.ERROR, logger="sse_handler"):
        await asyncio.sleep(0)
    assert ran == [1, 2]
    assert "after a batch" in caplog.text and "RuntimeError: after" in caplog.text


def test_an_interrupt_in_an_after_batch_callback_keeps_the_later_ones() -> None:
    """As for the batch itself: a KeyboardInterrupt in one callback reaches the
    loop's runner, and the callbacks after it run when the loop runs again
    (a stream whose first write they make would otherwise stay held)."""
    ran: list[int] = []

    def callback(n: int) -> None:
        if n == 1:
            raise KeyboardInterrupt
        ran.append(n)

    async def work(n: int) -> None:
        after_batch(lambda: callback(n))

    _interrupted_then_run_again(work)
    assert ran == [0, 2, 3]
