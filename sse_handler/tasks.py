"""The one way this package starts a background task.

The event loop keeps only weak references to tasks, so a task nobody holds
may be collected mid-flight; and a task whose exception nobody reads fails
silently. :func:`spawn` keeps a strong reference until the task is done and
logs its failure once, on the package's logger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

__all__ = ["cancel", "log", "spawn"]

#: The package's one logger.
log = logging.getLogger("sse_handler")

_running: set[asyncio.Future[Any]] = set()


def spawn(awaitable: Awaitable[Any], what: str) -> asyncio.Future[Any]:
    """Run ``awaitable`` in the background; a failure is logged as ``what``."""
    task = asyncio.ensure_future(awaitable)
    _running.add(task)
    task.add_done_callback(lambda done: _finished(done, what))
    return task


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
