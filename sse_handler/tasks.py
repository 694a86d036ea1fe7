"""The one way this package starts a background task.

The event loop keeps only weak references to tasks, so a task nobody holds
may be collected mid-flight; and a task whose exception nobody reads fails
silently. :func:`spawn` keeps a strong reference until the task is done and
logs its failure once, on the package's logger.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

__all__ = ["cancel", "log", "spawn", "start_eagerly"]

#: The package's one logger.
log = logging.getLogger("sse_handler")

_running: set[asyncio.Future[Any]] = set()


def spawn(awaitable: Awaitable[Any], what: str) -> asyncio.Future[Any]:
    """Run ``awaitable`` in the background; a failure is logged as ``what``."""
    task = asyncio.ensure_future(awaitable)
    _running.add(task)
    task.add_done_callback(lambda done: _finished(done, what))
    return task


def start_eagerly(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Future[Any] | None:
    """Run ``coro`` now, up to the first time it really waits; only then does
    the rest become a task (as :func:`spawn`). ``None`` when it finished
    without waiting.

    Why: most accepted streams register without waiting on anything (a
    synchronous ``authorize()``, the memory broker), and a task costs a loop
    callback and a context switch per stream in an accept storm. Python 3.12
    has this as ``eager_start``; 3.11 does not. A failure in the eager part is
    logged as ``what`` too, never raised to the caller.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    except Exception as exc:
        log.error("Uncaught exception in %s", what, exc_info=exc)
        return None
    return spawn(_continue(coro, waiting_on), what)


async def _continue(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    return await _resume(coro, waiting_on)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """The rest of a coroutine that :func:`start_eagerly` began: what it
    waits on goes to the task, and what the task sends or throws goes back."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation goes back in too
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as stop:
                return stop.value


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
