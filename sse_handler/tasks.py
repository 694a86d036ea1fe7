"""The one way this package starts a background task.

The event loop keeps only weak references to tasks, so a task nobody holds
may be collected mid-flight; and a task whose exception nobody reads fails
silently. :func:`spawn` keeps a strong reference until the task is done and
logs its failure once, on the package's logger.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

__all__ = ["cancel", "log", "spawn", "until_done"]

#: The package's one logger.
log = logging.getLogger("sse_handler")

_running: set[asyncio.Future[Any]] = set()


def spawn(awaitable: Awaitable[Any], what: str) -> asyncio.Future[Any]:
    """Run ``awaitable`` in the background; a failure is logged as ``what``."""
    task = asyncio.ensure_future(awaitable)
    _running.add(task)
    task.add_done_callback(lambda done: _finished(done, what))
    return task


async def until_done(awaitable: Awaitable[Any], before_waiting: Callable[[], None]) -> Any:
    """Await ``awaitable``, calling ``before_waiting()`` once, just before it
    first really waits; a coroutine that finishes without waiting never
    triggers it (any other awaitable triggers it at once).

    Why: a stream's head is held back until its hooks are done, so that the
    head and what they send at once leave in one write; an ``async`` hook that
    waits (on a database, a broker) must not hold the head that long, but
    one that does not (a replay from memory) should not split the write.
    """
    if not inspect.iscoroutine(awaitable):
        before_waiting()
        return await awaitable
    return await _step_through(awaitable, before_waiting)


@types.coroutine
def _step_through(
    coro: Coroutine[Any, Any, Any], before_waiting: Callable[[], None]
) -> Generator[Any, Any, Any]:
    """Run ``coro`` inside the awaiting task, step by step (what ``await``
    does), with ``before_waiting()`` before its first wait."""
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        return done.value
    try:
        before_waiting()
    except BaseException:
        coro.close()
        raise
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation goes into the coroutine
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                return done.value


def cancel(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` if it is pending, unless it is the task running now (a
    task that ends its own connection finishes by itself)."""
    if task is None or task.done():
        return
    try:
        current = asyncio.current_task()
    except RuntimeError:  # no running loop: nothing is running
        current = None
    if task is not current:
        task.cancel()


def _finished(task: asyncio.Future[Any], what: str) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("Uncaught exception in %s", what, exc_info=task.exception())
