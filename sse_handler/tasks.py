"""The one way this package starts a background task.

The event loop keeps only weak references to tasks, so a task nobody holds
may be collected mid-flight; and a task whose exception nobody reads fails
silently. :func:`spawn` keeps a strong reference until the task is done and
logs its failure once, on the package's logger. :func:`start_soon` does the
same for work that usually finishes without waiting (a stream's
registration), without a task until it waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

__all__ = ["after_batch", "cancel", "in_task", "log", "spawn", "start_soon", "until_done"]

#: The package's one logger.
log = logging.getLogger("sse_handler")

_running: set[asyncio.Future[Any]] = set()


def spawn(awaitable: Awaitable[Any], what: str) -> asyncio.Future[Any]:
    """Run ``awaitable`` in the background; a failure is logged as ``what``."""
    task = asyncio.ensure_future(awaitable)
    _running.add(task)
    task.add_done_callback(lambda done: _finished(done, what))
    return task


def start_soon(coro: Coroutine[Any, Any, Any], what: str) -> None:
    """Run ``coro`` soon, in the background, as :func:`spawn` would, but
    without a task of its own until it waits: the coroutines started in one
    turn of the loop run one after the other in one callback of the next,
    each in a copy of the context it was started in; one that waits (on a
    future, or on :func:`in_task`) goes on in a task from there.

    Why: a stream's registration is a coroutine that, on the memory broker
    and with plain hooks, never waits; a task per stream (its creation, its
    steps and its done callback on the loop) was a tenth of the CPU of
    accepting one (docs/benchmarks.md, notes). Code that needs
    ``asyncio.current_task()`` (``asyncio.timeout``, say) must not run
    before the coroutine has awaited :func:`in_task`.
    """
    loop = asyncio.get_running_loop()
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = []
        loop.call_soon(_start_batch, loop)
    batch.append((contextvars.copy_context(), coro, what))


@types.coroutine
def in_task() -> Generator[Any, Any, None]:
    """Go on in a task (see :func:`start_soon`): at once if already in one."""
    if asyncio.current_task() is None:
        yield _TO_A_TASK


def after_batch(callback: Callable[[], None]) -> None:
    """Call ``callback`` once every coroutine of the :func:`start_soon` batch
    running now has run as far as it goes without waiting. Called from
    anywhere else in the loop (a task, another callback): soon, in one
    callback with the others of that turn of the loop.

    Why: registration ends with a stream's first write (its head and what
    the hooks sent). Made at the end of the batch, one after the other,
    those system calls no longer evict the Python code and data of the
    registrations between them from the CPU's caches: 0.93x the CPU of an
    accepted stream (docs/benchmarks.md, notes). Registrations that waited
    (on a broker's subscribe, say) go on in tasks, each in a callback of
    its own: their writes are gathered from the turn's tasks.
    """
    pending: list[Callable[[], None]] | None = getattr(_local, "after", None)
    if pending is not None:
        pending.append(callback)
        return
    loop = asyncio.get_running_loop()
    soon = _soon.get(loop)
    if soon is None:
        soon = _soon[loop] = []
        loop.call_soon(_run_soon, loop)
    soon.append(callback)


def _run_soon(loop: asyncio.AbstractEventLoop) -> None:
    _run_after(loop, _soon.pop(loop, []))


# The after_batch() callbacks of a turn's tasks, by loop.
_soon: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


# What in_task() hands to start_soon's callback: "give me a task".
_TO_A_TASK = object()
_Started = tuple[contextvars.Context, Coroutine[Any, Any, Any], str]
_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Started]] = (
    weakref.WeakKeyDictionary()
)


# The after_batch() callbacks of the batch running in this thread (a loop
# runs its callbacks one at a time, in one thread).
_local = threading.local()


def _start_batch(loop: asyncio.AbstractEventLoop) -> None:
    after: list[Callable[[], None]] = []
    _local.after = after
    try:
        _run_batch(loop, _batches.pop(loop, []))
    finally:
        _local.after = None
        _run_after(loop, after)


def _run_after(loop: asyncio.AbstractEventLoop, after: list[Callable[[], None]]) -> None:
    for at, callback in enumerate(after):
        try:
            callback()
        except (KeyboardInterrupt, SystemExit):
            # As for the batch: the rest is not lost, it runs when the loop does again.
            rest = after[at + 1 :]
            if rest:
                loop.call_soon(_run_after, loop, rest)
            raise
        except Exception:
            log.exception("Uncaught exception in %r after a batch", callback)


def _run_batch(loop: asyncio.AbstractEventLoop, batch: list[_Started]) -> None:
    for at, (context, coro, what) in enumerate(batch):
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration:
            continue
        except (KeyboardInterrupt, SystemExit):
            # The rest of the batch is not lost: it runs when the loop does again.
            rest = batch[at + 1 :]
            if rest:
                _batches.setdefault(loop, [])[:0] = rest
                loop.call_soon(_start_batch, loop)
            raise
        except asyncio.CancelledError:
            continue  # as a cancelled task: nothing to report
        except BaseException as exc:
            log.error("Uncaught exception in %s", what, exc_info=exc)
            continue
        if asyncio.isfuture(waiting_on):
            # As a task does with the future its coroutine yields: taken, so
            # that another coroutine of the batch may await it too (awaiting
            # a future marked as waited on raises); _go_on gives it back.
            waiting_on._asyncio_future_blocking = False
        task = loop.create_task(_go_on(coro, waiting_on), context=context)
        _running.add(task)
        task.add_done_callback(functools.partial(_finished, what=what))
        # A task cancelled before its first step never reaches the coroutine:
        # closed then, its own cleanup runs (a no-op once it has finished).
        task.add_done_callback(functools.partial(_close, coro))


def _close(coro: Coroutine[Any, Any, Any], _: asyncio.Future[Any]) -> None:
    coro.close()


async def _go_on(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """The rest of a coroutine that ``start_soon`` began, inside a task: first
    what it was waiting on (unless it asked for the task), then each step.
    (A coroutine function: a task takes no generator since Python 3.12.)"""
    if waiting_on is _TO_A_TASK:
        try:
            waiting_on = coro.send(None)
        except StopIteration as done:
            return done.value
    elif asyncio.isfuture(waiting_on):
        waiting_on._asyncio_future_blocking = True  # as the coroutine's await left it
    return await _forward(coro, waiting_on)


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
    return (yield from _forward(coro, waiting_on))


@types.coroutine
def _forward(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """What ``await coro`` does once ``coro`` is waiting on ``waiting_on``:
    wait on it inside the awaiting task, then on each next step's."""
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
