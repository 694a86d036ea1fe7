"""Redis Streams broker: fan-out across processes and hosts, shared history.

One stream per channel (``<prefix><channel>``). ``publish`` is one ``XADD``
with an approximate ``MAXLEN`` (and an ``XTRIM MINID`` when an age bound is
set); the stream entry id (``<ms>-<seq>``) is the event id. Each process runs
one reader task that ``XREAD BLOCK``s over the channels it has subscribers for,
starting from the last entry it saw of each, so when Redis goes away and comes
back, nothing published meanwhile is skipped. Replay is ``XRANGE`` after the
cursor over the client's channels, merged by entry id.

Works with Redis 6.2+ and Valkey (exclusive ``XRANGE`` ranges need 6.2).
Entry ids of different streams are comparable because one Redis server
assigns them from one clock; on Redis Cluster keep a client's channels on one
shard with a hash tag in the prefix (e.g. ``prefix="sse:{app}:"``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Collection
from typing import Any

try:
    from redis import asyncio as aioredis
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "RedisBroker needs the redis extra: pip install 'sse_handler[redis]'"
    ) from exc

from ..event import ServerSentEvent
from ..tasks import spawn
from . import BrokerUnavailableError, Delivery, Listener, Replay, body_frame

__all__ = ["RedisBroker"]

log = logging.getLogger("sse_handler.redis")

Position = tuple[int, int]


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailableError:
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return BrokerUnavailableError(
            f"Redis at {url} did not answer in time ({exc}); the command may still run",
            published=None,
        )
    return BrokerUnavailableError(f"Redis at {url} is unavailable: {exc}", published=False)


def _position(entry_id: str) -> Position | None:
    ms, sep, seq = entry_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    return (int(ms), int(seq))


class RedisBroker:
    """Channels on Redis Streams.

    ``url`` as redis-py takes it (``redis://host:6379/0``). ``history_size``
    entries per channel (approximate trimming, so a few more may stay) and
    ``history_age`` seconds (0 = no age bound) are kept for replay.
    ``block`` is the longest an ``XREAD`` waits before it is re-issued;
    ``timeout`` bounds every other command (and the reader's wait beyond
    ``block``), so that a Redis that hangs (paused, partitioned) makes
    ``publish`` fail with :class:`BrokerUnavailableError` instead of waiting.
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
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.history_size = history_size
        self.history_age = history_age
        self.block = block
        self.max_backoff = max_backoff
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        # The blocking reader gets its own connection: a pooled connection
        # parked in XREAD BLOCK would stall the publishers behind it.
        self._reader_redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=block + timeout,
            socket_connect_timeout=timeout,
            single_connection_client=True,
        )
        self._listeners: list[Listener] = []
        #: Last entry id seen per subscribed channel.
        self._cursors: dict[str, str] = {}
        # A stream of our own in every XREAD, so that subscribe() can wake a
        # reader parked in BLOCK with the new channel set.
        self._wake_key = f"{prefix}__wake:{secrets.token_hex(8)}"
        self._reader: asyncio.Future[Any] | None = None
        self._closed = False

    def _key(self, channel: str) -> str:
        return self.prefix + channel

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        body = event.encode()
        fields: dict[str, bytes | str] = {"b": body}
        if event.id is not None:
            fields["i"] = event.id
        try:
            entry_id = await self._redis.xadd(
                self._key(channel), fields, maxlen=self.history_size, approximate=True
            )
            if self.history_age:
                min_ms = int((time.time() - self.history_age) * 1000)
                await self._redis.xtrim(self._key(channel), minid=min_ms, approximate=True)
        except (RedisError, OSError) as exc:
            raise _unavailable(self.url, exc) from exc
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return event.id if event.id is not None else entry

    async def subscribe(self, channel: str) -> None:
        if channel in self._cursors:
            return
        # Start from the newest entry that exists now: whatever is published
        # after this call returns is delivered, however late the reader runs.
        try:
            newest = await self._redis.xrevrange(self._key(channel), count=1)
        except (RedisError, OSError) as exc:
            raise _unavailable(self.url, exc) from exc
        self._cursors[channel] = newest[0][0].decode() if newest else "0-0"
        if self._reader is None:
            self._reader = spawn(self._read_loop(), f"the Redis reader of {self.url}")
        else:
            await self._wake()

    async def unsubscribe(self, channel: str) -> None:
        self._cursors.pop(channel, None)

    async def _wake(self) -> None:
        try:
            await self._redis.xadd(self._wake_key, {"w": b""}, maxlen=1)
            await self._redis.expire(self._wake_key, 60)
        except (RedisError, OSError):
            pass  # the reader is reconnecting and will see the new channel set

    async def _read_loop(self) -> None:
        backoff = 0.05
        wake_cursor = "$"
        while not self._closed:
            streams = {self._key(ch): cur for ch, cur in self._cursors.items()}
            streams[self._wake_key] = wake_cursor
            try:
                result = await self._reader_redis.xread(streams, block=int(self.block * 1000))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("Redis read failed (%s); retrying in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05
            for key, entries in result or ():
                key = key.decode() if isinstance(key, bytes) else key
                if key == self._wake_key:
                    wake_cursor = entries[-1][0].decode()
                    continue
                channel = key[len(self.prefix) :]
                if channel not in self._cursors:
                    continue
                for entry_id, fields in entries:
                    eid = entry_id.decode()
                    self._cursors[channel] = eid
                    self._deliver(self._delivery(channel, eid, fields))

    def _delivery(self, channel: str, entry_id: str, fields: dict[bytes, bytes]) -> Delivery:
        caller_id = fields.get(b"i")
        event_id = caller_id.decode() if caller_id is not None else entry_id
        frame = body_frame(event_id, fields[b"b"], caller_id is not None)
        return Delivery(channel, event_id, _position(entry_id), frame)

    def _deliver(self, delivery: Delivery) -> None:
        for listener in self._listeners:
            try:
                listener(delivery)
            except Exception:
                log.exception("Uncaught exception in a broker listener")

    def position(self, event_id: str) -> Position | None:
        return _position(event_id)

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        cursor = _position(last_event_id)
        try:
            if cursor is None:
                cursor = await self._caller_id_position(channels, last_event_id)
                if cursor is None:
                    return Replay(reset="unknown_id")
            start = f"({cursor[0]}-{cursor[1]}"
            found: list[Delivery] = []
            for channel in channels:
                if await self._trimmed_after(channel, cursor):
                    return Replay(reset="history_exceeded")
                entries = await self._redis.xrange(self._key(channel), min=start)
                found.extend(self._delivery(channel, e.decode(), f) for e, f in entries)
        except (RedisError, OSError) as exc:
            raise _unavailable(self.url, exc) from exc
        found.sort(key=lambda d: d.position)
        return Replay(found)

    async def _trimmed_after(self, channel: str, cursor: Position) -> bool:
        """Were entries after ``cursor`` trimmed away from this channel?

        Trimming only ever removes the oldest entries, so they all sit before
        the stream's first entry: a cursor older than that, on a stream that
        has lost entries, may have missed some. (A cursor exactly on the last
        trimmed entry also counts: the client gets a reset it did not strictly
        need, never a silent gap.)
        """
        try:
            info = await self._redis.xinfo_stream(self._key(channel))
        except RedisError:
            return False  # no such stream: nothing was ever trimmed
        first = info.get("first-entry")
        if not first:
            return False
        added = info.get("entries-added")  # Redis 7+
        length = int(info.get("length", 0))
        trimmed = int(added) > length if added is not None else length >= self.history_size
        first_pos = _position(first[0].decode() if isinstance(first[0], bytes) else first[0])
        return trimmed and first_pos is not None and first_pos > cursor

    async def _caller_id_position(
        self, channels: Collection[str], event_id: str
    ) -> Position | None:
        """Where an id that the publisher chose sits, if still in the history."""
        wanted = event_id.encode()
        for channel in channels:
            for entry_id, fields in await self._redis.xrevrange(self._key(channel)):
                if fields.get(b"i") == wanted:
                    return _position(entry_id.decode())
        return None

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        await self._reader_redis.aclose()
        await self._redis.aclose()
