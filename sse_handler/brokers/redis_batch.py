"""One Lua script run for many callers, in batches, on one Redis node.

:class:`ScriptBatch` queues each call; the calls that queue while a batch is
out leave together as the next one: one connection from the pool, one write,
the replies read in order. Nothing waits for a batch to fill: a lone call
leaves at once, and batches grow only with the load.

Why: through redis-py, each ``EVALSHA`` paid for a pooled connection, the
retry wrapper, a write and a read of its own, and Redis a wake-up of its
own. With 8 publishers racing, a publish and its delivery now take about two
thirds of the CPU they did; with 64, two fifths (``python -m
bench.broker_ops``; docs/benchmarks.md, notes). Callers that race also
reach Redis in the order they called, not in whichever order their
connections did.

Failures keep the meaning a single command has: a batch that never left
(connecting failed, no connection free) is tried again after a backoff, up to
``retries`` times; one that failed after it was sent may have run, and is
never sent again. A call that answers ``NOSCRIPT`` never ran: the script is
loaded once and those calls sent again. A caller cancelled before its call
left never publishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import (
    BusyLoadingError,
    MaxConnectionsError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ..tasks import spawn

__all__ = ["NodeConnections", "ScriptBatch", "closed_by_server"]

#: At most this many calls leave in one write; more wait for the next batch.
MAX_BATCH = 256

_Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


def _closed() -> RedisError:
    return RedisError("the broker is closed")


def _cut_off() -> RedisError:
    # A connection error after sending: what the callers get means "may have run".
    return RedisConnectionError("the broker was closed while the batch was out")


def _takes_command_name(pool: Any) -> bool:
    """Whether ``pool``'s checkout requires a command's name (redis-py before
    5.3; from 5.3 on, passing one is deprecated). A subclass that passes its
    arguments on (``*args``) says nothing: the first class with the
    parameter decides."""
    for cls in type(pool).__mro__:
        method = cls.__dict__.get("get_connection")
        if method is None:
            continue
        parameter = inspect.signature(method).parameters.get("command_name")
        if parameter is not None:
            return parameter.default is inspect.Parameter.empty
    return False


def closed_by_server(connection: Any) -> bool:
    """Whether the server has closed ``connection`` (a restart: every pooled
    connection was closed by the old server). A command sent on one fails
    after it was sent ("Connection closed by server"), which for a publish
    cannot be told from one that ran; so it is checked before anything is
    written, on the connection's ``asyncio.StreamReader`` (redis-py checks
    at checkout in some versions only: not in 5.x, not with RESP3 in 8.x)."""
    reader = getattr(connection, "_reader", None)
    return reader is not None and (reader.at_eof() or reader.exception() is not None)


class NodeConnections:
    """The connections of one Redis Cluster node (redis-py's ``ClusterNode``),
    handed out as :class:`ScriptBatch` takes them from a pool: connected, one
    the server has closed replaced first. None free and the node at its
    ``max_connections``: "Too many connections", before anything was sent."""

    def __init__(self, node: Any) -> None:
        self.node = node

    async def get_connection(self) -> Any:
        try:
            connection = self.node.acquire_connection()
        except MaxConnectionsError as exc:
            raise RedisConnectionError("Too many connections") from exc
        try:
            if closed_by_server(connection):
                await connection.disconnect()
            if not connection.is_connected:
                await connection.connect()
        except BaseException:
            self._give_back(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        self._give_back(connection)

    def _give_back(self, connection: Any) -> None:
        release = getattr(self.node, "release", None)
        if release is not None:
            release(connection)
        else:
            # redis-py before 6.2 has no release(): its own commands put the
            # connection back on the node's free queue, as done here.
            self.node._free.append(connection)


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
        self._name = ("EVALSHA",) if _takes_command_name(pool) else ()
        self._queue: deque[_Call] = deque()
        #: The task that sends the batches; it waits on ``_idle`` between them
        #: rather than ending: a lone call then costs no task of its own.
        self._draining: asyncio.Future[Any] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._closed = False
        self._retired = False

    async def run(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply for ``keys`` and ``args``; raises what
        ``failure`` makes of a Redis error (the reply of an error included)."""
        if self._closed:
            raise self._failure(_closed())
        loop = asyncio.get_running_loop()
        call: asyncio.Future[Any] = loop.create_future()
        draining = self._draining
        if draining is None or draining.done() or draining.get_loop() is not loop:
            # None yet, or one left behind by an event loop that ended.
            self._idle = None
            self._draining = spawn(self._drain(), "publishing to Redis")
        elif self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self._queue.append((keys, args, call))
        return await call

    def retire(self) -> None:
        """No more calls are coming (the node this batch sends to was
        replaced, or left the cluster's layout): the calls queued and out are
        sent and answered as usual,
        and then the task that sends them ends instead of waiting for more."""
        self._retired = True
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    @property
    def finished(self) -> bool:
        """Retired, and every call it had is answered (its task has ended)."""
        return self._retired and (self._draining is None or self._draining.done())

    async def close(self) -> None:
        """Stop: the calls not sent yet fail, and :meth:`run` refuses more."""
        self._closed = True
        draining, self._draining = self._draining, None
        # A task of an event loop that ended cannot be cancelled (its loop
        # is closed): it is dropped.
        if draining is not None and draining.get_loop() is asyncio.get_running_loop():
            draining.cancel()
            try:
                await draining
            except (asyncio.CancelledError, Exception):
                pass
        self._fail(list(self._queue), _closed())
        self._queue.clear()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        batch: list[_Call] = []
        try:
            while True:
                if not self._queue:
                    if self._retired:
                        return
                    self._idle = loop.create_future()
                    try:
                        await self._idle
                    finally:
                        self._idle = None
                batch = []
                while self._queue and len(batch) < MAX_BATCH:
                    batch.append(self._queue.popleft())
                await self._send(batch)
        except BaseException as exc:
            # No caller waits forever, whatever went wrong: _send answered
            # what it sent; the rest never left.
            failure = exc if isinstance(exc, Exception) else _closed()
            self._fail([*batch, *self._queue], failure)
            self._queue.clear()
            raise
        finally:
            if self._draining is me:
                self._draining = None

    async def _send(self, batch: list[_Call]) -> None:
        backoff = 0.05
        attempt = 0
        load = True
        while True:
            # A caller cancelled meanwhile (during a backoff, say): its call
            # is never sent.
            batch = [call for call in batch if not call[2].done()]
            if not batch:
                return
            try:
                connection = await self._pool.get_connection(*self._name)
            except Exception as exc:
                if attempt == self._retries or not self._not_sent(exc):
                    self._fail(batch, exc)
                    return
                attempt += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            try:
                batch = await self._exchange(connection, batch, load=load)
                load = False
            except asyncio.CancelledError:
                await connection.disconnect(nowait=True)
                self._fail(batch, _cut_off())
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

    async def _exchange(self, connection: Any, batch: list[_Call], *, load: bool) -> list[_Call]:
        """Send ``batch`` on ``connection`` and answer each call; returns the
        calls that found no script (they never ran), after loading it if
        ``load``; otherwise they fail (a script gone again at once: a proxy
        that spreads commands over servers, or ``SCRIPT FLUSH`` in a loop)."""
        commands = [("EVALSHA", self._sha, len(keys), *keys, *args) for keys, args, _ in batch]
        await connection.send_packed_command(
            connection.pack_commands(commands), check_health=False
        )
        again: list[_Call] = []
        for call in batch:
            try:
                # A failed read leaves the connection to _send, which drops
                # it; an error reply (-LOADING included) leaves it as it is.
                reply = await connection.read_response(disconnect_on_error=False)
            except NoScriptError as exc:
                if load:
                    again.append(call)
                else:
                    self._fail([call], exc)
                continue
            # This call's own error; the others go on. -LOADING is one too,
            # though redis-py raises it as a connection error: the reply was
            # read whole, and the call did not run.
            except (ResponseError, BusyLoadingError) as exc:
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
