"""Redis Streams broker: fan-out across processes and hosts, shared history.

Keys, under ``prefix`` (default ``sse:``)::

    <prefix>c:<channel>    the channel's stream: one entry per event
    <prefix>i:<channel>    a hash: ids that publishers chose -> entry ids
    <prefix>w:<random>     one process's wake stream

``<channel>`` is the channel name with ``%``, ``:``, ``{`` and ``}``
percent-encoded, so a key never holds a ``:`` after its kind letter: no key of
one prefix equals a key of a longer prefix that starts with it (``sse:`` and
``sse:tenant2:`` on one Redis never share a key, whatever the channel names),
and a hash tag in the prefix (``sse:{app}:``) is the only one in every key.

``publish`` is one ``XADD`` with an approximate ``MAXLEN`` (and an ``XTRIM
MINID`` when an age bound is set); the stream entry id (``<ms>-<seq>``) is the
event id. Each process runs one reader task that ``XREAD BLOCK``s over the
channels it has subscribers for, starting from the last entry it saw of each,
so when Redis goes away and comes back, nothing published meanwhile is skipped.
A supervisor restarts the reader after any failure (with backoff), and
entries that sse_handler did not write are skipped with a warning.
Replay is ``XINFO STREAM`` then ``XRANGE`` after the cursor over the client's
channels, merged by entry id; an id that a publisher chose is found through
the channel's id hash, never by scanning the history.

Works with Redis 6.2+ and Valkey. Entry ids of different streams are
comparable because one Redis server assigns them from one clock; on Redis
Cluster keep a client's channels on one shard with a hash tag in the prefix
(e.g. ``prefix="sse:{app}:"``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    from redis import asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import EqualJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "RedisBroker needs the redis extra: pip install 'sse_handler[redis]'"
    ) from exc

from ..event import ServerSentEvent
from ..tasks import spawn
from . import BrokerUnavailableError, Delivery, Listener, Replay, body_frame

__all__ = ["RedisBroker", "channel_key"]

log = logging.getLogger("sse_handler.redis")

Position = tuple[int, int]

#: The largest part of a stream entry id (Redis ids are two unsigned 64-bit ints).
_MAX_PART = 2**64 - 1
#: ASCII digits only (``str.isdigit`` also accepts ``²`` and ``٣``), at most
#: 20 of them: the length of ``_MAX_PART``.
_PART = re.compile(r"[0-9]{1,20}")
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})
#: A malformed entry of one stream is logged at most this often (seconds).
_WARN_EVERY = 60.0


def channel_key(prefix: str, channel: str, kind: str = "c") -> str:
    """The Redis key of ``channel``'s stream (``kind`` ``"c"``) or id hash (``"i"``)."""
    return f"{prefix}{kind}:{channel.translate(_ESCAPES)}"


def _position(entry_id: str) -> Position | None:
    """``(ms, seq)`` of a stream entry id, or ``None`` for anything else."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not _PART.fullmatch(ms) or not _PART.fullmatch(seq):
        return None
    position = (int(ms), int(seq))
    if position[0] > _MAX_PART or position[1] > _MAX_PART:
        return None
    return position


def _after(position: Position) -> Position | None:
    """The smallest entry id after ``position`` (``None`` after the largest)."""
    ms, seq = position
    if seq < _MAX_PART:
        return (ms, seq + 1)
    if ms < _MAX_PART:
        return (ms + 1, 0)
    return None


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<the configured URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_frame(body: bytes) -> bool:
    """One event frame as :meth:`ServerSentEvent.encode` writes it: LF line
    endings, one blank line, at the end."""
    return body.endswith(b"\n\n") and body.find(b"\n\n") == len(body) - 2 and b"\r" not in body


def _not_sent(exc: BaseException) -> bool:
    """Did ``exc`` happen before the command went out (connecting, or waiting
    for a pooled connection)? redis-py tells these apart only by message."""
    text = str(exc)
    return "connecting to" in text or text.startswith(
        ("Timeout connecting", "No connection available", "Too many connections")
    )


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailableError:
    if _not_sent(exc):
        return BrokerUnavailableError(f"Redis at {url} is unavailable: {exc}", published=False)
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return BrokerUnavailableError(
            f"Redis at {url} did not answer in time ({exc}); the command may still run",
            published=None,
        )
    if isinstance(exc, RedisConnectionError | OSError):
        return BrokerUnavailableError(
            f"Redis at {url} is unavailable: {exc} (the connection failed after the "
            "command was sent; it may have run)",
            published=None,
        )
    return BrokerUnavailableError(f"Redis at {url} is unavailable: {exc}", published=False)


class _Pool(aioredis.BlockingConnectionPool):
    """A pool that waits for a free connection, and replaces one that the
    server has closed before it is used.

    When Redis restarts, every pooled connection has been closed by the old
    server; a command sent on one fails after it was sent ("Connection closed
    by server"), which for an ``XADD`` cannot be told from a command that ran.
    redis-py checks for this at checkout in some versions only (not in 5.x,
    and not with RESP3 in 8.x), so the check is made here, on the
    connection's ``asyncio.StreamReader``, before anything is written.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get: Any = super().get_connection  # untyped in redis-py
        connection = await get(*args, **kwargs)
        reader = getattr(connection, "_reader", None)
        if reader is None or not (reader.at_eof() or reader.exception() is not None):
            return connection
        try:
            await connection.disconnect()
            await connection.connect()
        except BaseException:
            await self.release(connection)
            raise
        return connection


@dataclass(frozen=True, slots=True)
class _Stream:
    """What replay needs of ``XINFO STREAM``."""

    last: Position
    first: Position | None
    trimmed: bool


class RedisBroker:
    """Channels on Redis Streams.

    ``url`` as redis-py takes it (``redis://host:6379/0``). ``history_size``
    entries per channel (approximate trimming, so a few more may stay) and
    ``history_age`` seconds (0 = no age bound) are kept for replay.
    ``block`` is the longest an ``XREAD`` waits before it is re-issued;
    ``timeout`` bounds every other command (and the reader's wait beyond
    ``block``), so that a Redis that hangs (paused, partitioned) makes
    ``publish`` fail with :class:`BrokerUnavailableError` instead of waiting.

    Connections: publishes use a pool of at most ``max_connections``, and
    reads (subscribe, replay) another one of the same size; the reader has one
    of its own. A command that finds its pool busy waits for a connection, up
    to ``pool_timeout`` seconds (default: ``timeout``), then fails with
    :class:`BrokerUnavailableError` (``published=False``). Reads are retried
    ``retries`` times with backoff on a connection error or a timeout; an
    ``XADD`` only when it certainly did not reach Redis (connecting failed),
    so an event is never stored twice. Connections that Redis closed (a
    restart) are replaced before a command is sent on them; a read connection
    idle for ``health_check_interval`` seconds is checked with a ``PING``.

    ``reader_healthy``, ``reader_error``, ``reader_restarts`` and
    ``malformed_entries`` tell how the reader is doing (see
    ``docs/channels.md``).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "sse:",
        history_size: int = 1000,
        history_age: float = 0.0,
        block: float = 5.0,
        max_backoff: float = 2.0,
        timeout: float = 5.0,
        max_connections: int = 50,
        pool_timeout: float | None = None,
        retries: int = 2,
        health_check_interval: float = 5.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.url = url
        self._where = _redacted(url)
        self.prefix = prefix
        self.history_size = history_size
        self.history_age = history_age
        self.block = block
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.max_connections = max_connections
        self.pool_timeout = timeout if pool_timeout is None else pool_timeout
        self.retries = retries
        # RESP2, for the same replies from every redis-py version (>= 8
        # speaks RESP3 by default).
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        read_pool = _Pool.from_url(
            url,
            max_connections=max_connections,
            timeout=self.pool_timeout,
            health_check_interval=health_check_interval,
            retry=Retry(EqualJitterBackoff(cap=max_backoff, base=0.05), retries),
            **common,
        )
        self._redis: Any = aioredis.Redis.from_pool(read_pool)
        # No automatic retry for XADD: a command that failed after it was
        # sent may have run, and running it again would store the event twice.
        publish_pool = _Pool.from_url(
            url, max_connections=max_connections, timeout=self.pool_timeout, **common
        )
        self._publish_redis: Any = aioredis.Redis.from_pool(publish_pool)
        # The blocking reader gets its own connection: a pooled connection
        # parked in XREAD BLOCK would stall the commands behind it.
        self._reader_redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=block + timeout,
            socket_connect_timeout=timeout,
            single_connection_client=True,
            protocol=2,
        )
        self._listeners: list[Listener] = []
        #: Last entry id seen per subscribed channel.
        self._cursors: dict[str, str] = {}
        #: Stream key (as Redis returns it) -> channel, for the reader.
        self._channels: dict[bytes, str] = {}
        #: Subscribed channels whose key holds something other than a stream.
        self._wrong_type: set[str] = set()
        self._wrong_type_checked = 0.0
        #: When a malformed entry of a stream was last logged.
        self._warned: dict[bytes, float] = {}
        # A stream of our own in every XREAD, so that subscribe() can wake a
        # reader parked in BLOCK with the new channel set.
        self._wake_key = f"{prefix}w:{secrets.token_hex(8)}"
        self._wake_bytes = self._wake_key.encode()
        self._reader: asyncio.Future[Any] | None = None
        self._pruning: dict[str, asyncio.Future[Any]] = {}
        self._closed = False
        self._healthy = True
        self._error: str | None = None
        #: Times the supervisor restarted the reader after an unexpected error.
        self.reader_restarts = 0
        #: Entries skipped because sse_handler did not write them.
        self.malformed_entries = 0

    # ------------------------------------------------------------ health

    @property
    def reader_healthy(self) -> bool:
        """``False`` from a failed read until the next one succeeds."""
        return self._healthy

    @property
    def reader_error(self) -> str | None:
        """Why the reader is unhealthy (``None`` while it is healthy)."""
        return None if self._healthy else self._error

    def _read_failed(self, exc: BaseException) -> None:
        self._healthy = False
        self._error = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------ keys

    def stream_key(self, channel: str) -> str:
        """The Redis key of ``channel``'s stream."""
        return channel_key(self.prefix, channel)

    def _index_key(self, channel: str) -> str:
        return channel_key(self.prefix, channel, "i")

    # ------------------------------------------------------------ publish

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        body = event.encode()
        fields: dict[str, bytes | str] = {"b": body}
        if event.id is not None:
            fields["i"] = event.id
        key = self.stream_key(channel)
        entry = await self._xadd(key, fields)
        if self.history_age or event.id is not None:
            # The event is stored: whatever fails now must not make the
            # caller publish it again.
            await self._after_publish(channel, key, event.id, entry)
        return event.id if event.id is not None else entry

    async def _xadd(self, key: str, fields: dict[str, bytes | str]) -> str:
        backoff = 0.05
        for attempt in range(self.retries + 1):
            try:
                entry_id = await self._publish_redis.xadd(
                    key, fields, maxlen=self.history_size, approximate=True
                )
                return _text(entry_id)
            except (RedisError, OSError) as exc:
                # Connecting failed: the command never left. Anything else
                # may have reached Redis, and is not sent again.
                refused = isinstance(exc, RedisConnectionError) and "connecting to" in str(exc)
                if attempt == self.retries or not refused:
                    raise _unavailable(self._where, exc) from exc
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _after_publish(
        self, channel: str, key: str, caller_id: str | None, entry: str
    ) -> None:
        """Trim by age and index a publisher's id; a failure here is logged."""
        try:
            async with self._publish_redis.pipeline(transaction=False) as pipe:
                if self.history_age:
                    min_ms = int((time.time() - self.history_age) * 1000)
                    pipe.xtrim(key, minid=min_ms, approximate=True)
                if caller_id is not None:
                    pipe.hset(self._index_key(channel), caller_id, entry)
                    pipe.hlen(self._index_key(channel))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning(
                "Event %s of channel %r is stored, but trimming or indexing it failed (%s); "
                "a client resuming from a publisher's id may get a reset",
                entry,
                channel,
                exc,
            )
            return
        crowded = caller_id is not None and results[-1] > 2 * self.history_size + 256
        if crowded and channel not in self._pruning:
            self._pruning[channel] = spawn(
                self._prune_index(channel), f"pruning the id hash of {channel!r}"
            )

    async def _prune_index(self, channel: str) -> None:
        """Drop the ids whose entries were trimmed away from the channel's stream.

        The hash grows by one field per publish with an id of the publisher's;
        this runs when it holds about twice ``history_size``, so its cost per
        publish stays constant.
        """
        index = self._index_key(channel)
        try:
            first = await self._redis.xrange(self.stream_key(channel), count=1)
            oldest = _position(_text(first[0][0])) if first else None
            stale: list[bytes] = []
            async for field, value in self._redis.hscan_iter(index, count=1000):
                position = _position(_text(value))
                if oldest is None or position is None or position < oldest:
                    stale.append(field)
            for start in range(0, len(stale), 1000):
                await self._publish_redis.hdel(index, *stale[start : start + 1000])
        except (RedisError, OSError) as exc:
            log.warning("Pruning the id hash of channel %r failed: %s", channel, exc)
        finally:
            self._pruning.pop(channel, None)

    # ------------------------------------------------------------ subscribe

    async def subscribe(self, channel: str) -> None:
        if channel in self._cursors:
            return
        key = self.stream_key(channel)
        # Start from the newest entry that exists now: whatever is published
        # after this call returns is delivered, however late the reader runs.
        try:
            newest = await self._redis.xrevrange(key, count=1)
        except ResponseError as exc:
            # Not a stream (another program's key): the reader reports and
            # skips it until it is one.
            log.warning("Redis key %r of channel %r is not a stream (%s)", key, channel, exc)
            newest = []
        except (RedisError, OSError) as exc:
            raise _unavailable(self._where, exc) from exc
        self._cursors[channel] = _text(newest[0][0]) if newest else "0-0"
        self._channels[key.encode()] = channel
        if self._reader is None:
            self._reader = spawn(self._supervise(), f"the Redis reader of {self._where}")
        else:
            await self._wake()

    async def unsubscribe(self, channel: str) -> None:
        if self._cursors.pop(channel, None) is not None:
            key = self.stream_key(channel).encode()
            self._channels.pop(key, None)
            self._warned.pop(key, None)
            self._wrong_type.discard(channel)

    async def _wake(self) -> None:
        try:
            async with self._publish_redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": b""}, maxlen=1)
                pipe.expire(self._wake_key, 60)
                await pipe.execute()
        except (RedisError, OSError):
            pass  # the reader is reconnecting and will see the new channel set

    # ------------------------------------------------------------ the reader

    async def _supervise(self) -> None:
        """Run the reader; restart it, with backoff, whatever it fails with."""
        backoff = 0.05
        while not self._closed:
            started = time.monotonic()
            try:
                await self._read_loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._read_failed(exc)
                self.reader_restarts += 1
                log.error(
                    "The Redis reader of %s failed; restarting it in %.2f s",
                    self._where,
                    backoff,
                    exc_info=exc,
                )
            await asyncio.sleep(backoff)
            # A reader that ran for a while starts again from the shortest wait.
            ran_long = time.monotonic() - started > 10 * self.max_backoff
            backoff = 0.05 if ran_long else min(backoff * 2, self.max_backoff)

    async def _read_loop(self) -> None:
        backoff = 0.05
        wake_cursor = "$"
        while not self._closed:
            if self._wrong_type and time.monotonic() > self._wrong_type_checked + 10:
                await self._check_types(set(self._wrong_type))
            streams = {
                self.stream_key(ch): cur
                for ch, cur in self._cursors.items()
                if ch not in self._wrong_type
            }
            streams[self._wake_key] = wake_cursor
            try:
                result = await self._reader_redis.xread(streams, block=int(self.block * 1000))
            except ResponseError as exc:
                # A key that is no stream fails the whole XREAD: find it, then
                # read the others without it.
                if not await self._check_types(set(self._cursors) - self._wrong_type):
                    self._read_failed(exc)
                    log.warning("Redis read failed (%s); retrying in %.2f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                continue
            except (RedisError, OSError) as exc:
                self._read_failed(exc)
                log.warning("Redis read failed (%s); retrying in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05
            self._healthy = True
            for raw_key, entries in result or ():
                key = raw_key if isinstance(raw_key, bytes) else str(raw_key).encode()
                if not entries:
                    continue
                if key == self._wake_bytes:
                    wake_cursor = _text(entries[-1][0])
                    continue
                channel = self._channels.get(key)
                if channel is None or channel not in self._cursors:
                    continue
                for entry_id, fields in entries:
                    eid = _text(entry_id)
                    # The cursor moves first: an entry that fails is not read again.
                    self._cursors[channel] = eid
                    delivery = self._delivery(channel, eid, fields)
                    if delivery is not None:
                        self._deliver(delivery)

    async def _check_types(self, channels: set[str]) -> bool:
        """Sort ``channels`` by whether their key holds a stream (or nothing yet).

        Returns whether a channel was newly found holding something else.
        """
        self._wrong_type_checked = time.monotonic()
        ordered = sorted(channels)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel in ordered:
                    pipe.type(self.stream_key(channel))
                types = [_text(t) for t in await pipe.execute()]
        except (RedisError, OSError):
            return False
        found = False
        for channel, kind in zip(ordered, types, strict=True):
            wrong = kind not in ("stream", "none")
            if wrong and channel not in self._wrong_type:
                found = True
                self._wrong_type.add(channel)
                log.warning(
                    "Redis key %r of channel %r holds a %s, not a stream: the channel "
                    "is not read until it is one",
                    self.stream_key(channel),
                    channel,
                    kind,
                )
            elif not wrong and channel in self._wrong_type:
                self._wrong_type.discard(channel)
                log.warning("Redis key %r is a stream again: reading it", self.stream_key(channel))
        return found

    def _delivery(self, channel: str, entry_id: str, fields: Any) -> Delivery | None:
        """The delivery of one stream entry; ``None`` (and a warning) for an
        entry that sse_handler did not write."""
        body = fields.get(b"b") if isinstance(fields, dict) else None
        caller = fields.get(b"i") if isinstance(fields, dict) else None
        position = _position(entry_id)
        event_id = entry_id
        problem = None
        if not isinstance(body, bytes):
            problem = "no body field"
        elif not _is_frame(body):
            problem = "its body is not one event frame"
        elif position is None:
            problem = "its id is not a stream entry id"
        elif caller is not None:
            try:
                event_id = caller.decode()
            except (AttributeError, UnicodeDecodeError):
                problem = "its id field is not UTF-8 text"
            else:
                if any(c in event_id for c in "\r\n\0"):
                    problem = "its id field holds a line break or NUL"
        if problem is not None or not isinstance(body, bytes):
            self._malformed(channel, entry_id, problem or "no body field")
            return None
        frame = body_frame(event_id, body, caller is not None)
        return Delivery(channel, event_id, position, frame)

    def _malformed(self, channel: str, entry_id: str, problem: str) -> None:
        self.malformed_entries += 1
        key = self.stream_key(channel).encode()
        now = time.monotonic()
        last = self._warned.get(key)
        if last is None or now - last > _WARN_EVERY:
            self._warned[key] = now
            log.warning(
                "Skipped malformed entry %s of Redis stream %r (channel %r): %s; "
                "was it written by another program? (%d malformed entries so far; "
                "this stream is logged at most every %.0f s)",
                entry_id,
                key.decode(),
                channel,
                problem,
                self.malformed_entries,
                _WARN_EVERY,
            )

    def _deliver(self, delivery: Delivery) -> None:
        for listener in self._listeners:
            try:
                listener(delivery)
            except Exception:
                log.exception("Uncaught exception in a broker listener")

    # ------------------------------------------------------------ replay

    def position(self, event_id: str) -> Position | None:
        return _position(event_id)

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        channels = list(channels)
        if not channels:
            return Replay()
        try:
            cursor = _position(last_event_id)
            if cursor is None:
                cursor = await self._caller_id_position(channels, last_event_id)
                if cursor is None:
                    return Replay(reset="unknown_id")
            streams = await self._streams(channels)
            # Past every id Redis ever gave these channels: from another
            # Redis, a flushed one, or made up. Its events would be skipped.
            if cursor > max((s.last for s in streams if s), default=(0, 0)):
                return Replay(reset="unknown_id")
            if any(s is not None and self._trimmed_after(s, cursor) for s in streams):
                return Replay(reset="history_exceeded")
            start = _after(cursor)
            reading = [c for c, s in zip(channels, streams, strict=True) if s and s.last > cursor]
            if start is None or not reading:
                return Replay()
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel in reading:
                    pipe.xrange(self.stream_key(channel), min=f"{start[0]}-{start[1]}")
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(self._where, exc) from exc
        found = [
            delivery
            for channel, entries in zip(reading, results, strict=True)
            for entry_id, fields in entries
            if (delivery := self._delivery(channel, _text(entry_id), fields)) is not None
        ]
        found.sort(key=lambda delivery: delivery.position)
        return Replay(found)

    async def _streams(self, channels: Sequence[str]) -> list[_Stream | None]:
        """``XINFO STREAM`` of each channel (``None``: no stream there)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.xinfo_stream(self.stream_key(channel))
            infos = await pipe.execute(raise_on_error=False)
        streams: list[_Stream | None] = []
        for info in infos:
            if isinstance(info, ResponseError):
                streams.append(None)  # no such key, or not a stream
                continue
            if isinstance(info, Exception):
                raise info
            last = _position(_text(info.get("last-generated-id", b"0-0"))) or (0, 0)
            first_entry = info.get("first-entry")
            first = _position(_text(first_entry[0])) if first_entry else None
            added = info.get("entries-added")  # Redis 7+, Valkey
            length = int(info.get("length", 0))
            trimmed = int(added) > length if added is not None else length >= self.history_size
            streams.append(_Stream(last, first, trimmed))
        return streams

    @staticmethod
    def _trimmed_after(stream: _Stream, cursor: Position) -> bool:
        """Were entries after ``cursor`` trimmed away from this stream?

        Trimming only ever removes the oldest entries, so they all sit before
        the stream's first entry: a cursor older than that, on a stream that
        has lost entries, may have missed some. (A cursor exactly on the last
        trimmed entry also counts: the client gets a reset it did not strictly
        need, never a silent gap.) An empty stream that lost entries has
        lost those after any cursor older than its last id.
        """
        if not stream.trimmed:
            return False
        if stream.first is None:
            return cursor < stream.last
        return stream.first > cursor

    async def _caller_id_position(self, channels: Sequence[str], event_id: str) -> Position | None:
        """Where an id that a publisher chose sits: one ``HGET`` per channel.

        When several channels have it, the oldest counts: the client may get
        an event twice, never miss one.
        """
        try:
            wanted = event_id.encode()
        except UnicodeEncodeError:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.hget(self._index_key(channel), wanted)
            found = await pipe.execute(raise_on_error=False)
        positions = [
            position
            for entry in found
            if isinstance(entry, bytes) and (position := _position(entry.decode())) is not None
        ]
        return min(positions, default=None)

    # ------------------------------------------------------------ close

    async def close(self) -> None:
        self._closed = True
        for task in [self._reader, *self._pruning.values()]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._reader_redis.aclose()
        await self._redis.aclose()
        await self._publish_redis.aclose()
