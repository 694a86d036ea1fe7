"""One Lua script run for many callers, in batches, on one Redis node.

:class:`ScriptBatch` queues each call; the calls that queue while a batch is
out leave together as the next one: one connection from the pool, one write,
the replies read in order. Nothing waits for a batch to fill: a lone call
leaves at once, and batches grow only with the load.

Why: through redis-py, one ``EVALSHA`` costs its caller about 75 µs of CPU
(a pooled connection, its retry wrapper, its own write and read) and Redis a
wake-up of its own; in a batch of eight, about a third of that each
(docs/benchmarks.md, notes). Callers that race also reach Redis in the order
they called, not in whichever order their connections did.

Failures keep the meaning a single command has: a batch that never left
(connecting failed, no connection free) is tried again after a backoff, up to
``retries`` times; one that failed after it was sent may have run, and is
never sent again. A call that answers ``NOSCRIPT`` never ran: the script is
loaded and that call sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..tasks import spawn

__all__ = ["ScriptBatch"]

#: At most this many calls leave in one write; more wait for the next batch.
MAX_BATCH = 256

_Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


def _closed() -> RedisError:
    return RedisError("the broker is closed")


class ScriptBatch:
    """Runs ``script`` (Lua) for callers of :meth:`run`, in batches, on
    connections of ``pool`` (a redis-py asyncio connection pool)."""

    def __init__(
        self,
        pool: Any,
        script: str,
        *,
        failure: Callable[[BaseException], Exception],
        not_sent: Callable[[BaseException], bool],
        retries: int,
        max_backoff: float,
    ) -> None:
        self._pool = pool
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        #: Maps a failure to the error the callers get.
        self._failure = failure
        #: Whether a failure happened before anything was sent.
        self._not_sent = not_sent
        self._retries = retries
        self._max_backoff = max_backoff
        self._queue: deque[_Call] = deque()
        #: The task that sends the batches; it waits on ``_idle`` between them
        #: rather than ending: a lone call then costs no task of its own.
        self._draining: asyncio.Future[Any] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._closed = False

    async def run(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply for ``keys`` and ``args``; raises what
        ``failure`` makes of a Redis error (the reply of an error included)."""
        if self._closed:
            raise self._failure(_closed())
        call: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, call))
        if self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
        elif self._draining is None:
            self._draining = spawn(self._drain(), "publishing to Redis")
        return await call

    async def close(self) -> None:
        """Stop: the calls not sent yet fail, and :meth:`run` refuses more."""
        self._closed = True
        if self._draining is not None:
            self._draining.cancel()
            try:
                await self._draining
            except (asyncio.CancelledError, Exception):
                pass
        self._fail(list(self._queue), _closed())
        self._queue.clear()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._idle = loop.create_future()
                    try:
                        await self._idle
                    finally:
                        self._idle = None
                batch: list[_Call] = []
                while self._queue and len(batch) < MAX_BATCH:
                    call = self._queue.popleft()
                    if not call[2].done():  # its caller was cancelled: never sent
                        batch.append(call)
                if batch:
                    try:
                        await self._send(batch)
                    except BaseException as exc:
                        # No caller waits forever, whatever went wrong.
                        self._fail(batch, exc if isinstance(exc, Exception) else _closed())
                        raise
        finally:
            self._draining = None

    async def _send(self, batch: list[_Call]) -> None:
        backoff = 0.05
        attempt = 0
        while batch:
            try:
                connection = await self._checkout()
            except Exception as exc:
                if attempt == self._retries or not self._not_sent(exc):
                    self._fail(batch, exc)
                    return
                attempt += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            try:
                batch = await self._exchange(connection, batch)
            except asyncio.CancelledError:
                await connection.disconnect(nowait=True)
                self._fail(batch, _closed())
                raise
            except Exception as exc:
                # Sent, or perhaps sent: the calls not answered may have run,
                # and are never sent again. The next batch takes a new
                # connection.
                await connection.disconnect(nowait=True)
                self._fail(batch, exc)
                return
            finally:
                await self._pool.release(connection)

    def _checkout(self) -> Any:
        try:
            return self._pool.get_connection()
        except TypeError:  # redis-py before 5.3 requires a command's name
            return self._pool.get_connection("EVALSHA")

    async def _exchange(self, connection: Any, batch: list[_Call]) -> list[_Call]:
        """Send ``batch`` on ``connection`` and answer each call; returns the
        calls that found no script (they never ran), after loading it."""
        commands = [("EVALSHA", self._sha, len(keys), *keys, *args) for keys, args, _ in batch]
        await connection.send_packed_command(
            connection.pack_commands(commands), check_health=False
        )
        again: list[_Call] = []
        for call in batch:
            try:
                reply = await connection.read_response()
            except NoScriptError:
                again.append(call)
                continue
            except ResponseError as exc:  # this call's own error; the others go on
                self._fail([call], exc)
                continue
            if not call[2].done():
                call[2].set_result(reply)
        if again:
            await connection.send_command("SCRIPT", "LOAD", self._script)
            await connection.read_response()
        return again

    def _fail(self, calls: list[_Call], exc: BaseException) -> None:
        error = self._failure(exc)
        for _, _, call in calls:
            if not call.done():
                call.set_exception(error)
