"""Redis broker: fan-out across processes and hosts, shared history.

Keys, under ``prefix`` (default ``sse:``)::

    <prefix>c:<channel>    the channel's stream: one entry per event
    <prefix>i:<channel>    a hash: ids that publishers chose -> entry ids
    <prefix>s:             the sequence, a hash: ``last`` (the last id given
                           out), ``since`` (the first id of this history: its
                           epoch), ``c:<channel>`` (the id of its newest event)

and one Pub/Sub channel per channel, ``<prefix>p:<channel>``. ``<channel>`` is
the channel name with ``%``, ``:``, ``{`` and ``}`` percent-encoded, so a key
never holds a ``:`` after its kind letter: no key of one prefix equals a key
of a longer prefix that starts with it (``sse:`` and ``sse:tenant2:`` on one
Redis never share a key, whatever the channel names), and a hash tag in the
prefix (``sse:{app}:``) is the only one in every key.

**One sequence.** ``publish`` is one Lua script: it takes the next id of the
broker's sequence (``<ms>-<n>``: Redis's clock, never below the last id given
out), appends the entry to the channel's stream with that id (and the id of
the channel's previous event), and ``PUBLISH``es it. Ids are therefore unique
and ordered across all channels, and a client's single ``Last-Event-ID`` is
one exact cursor over all of its channels.

**Live delivery** is Redis Pub/Sub: subscribing a channel is one
``SUBSCRIBE`` (and one ``HGET``), whatever else the process reads, and each
process receives the events of its channels in the order the scripts ran.
When the Pub/Sub connection fails, the reader reconnects, subscribes again,
and reads what it missed from the streams in one ``MULTI`` (an atomic
snapshot), in id order, before it goes on: nothing is skipped, nothing
delivered twice. Where the history no longer covers the gap, the local
subscribers of the channel are told (:meth:`RedisBroker.add_gap_listener`)
and resume by ``Last-Event-ID``, which gets them a ``reset``.

**Replay** reads the streams after the cursor; the ``p`` field of the first
entry after it says whether something between was trimmed or evicted, the
``since`` field whether the cursor belongs to this history at all (Redis
restarted without its data, or the sequence key was evicted): either way the
client gets ``reset``, never a silent gap.

**Redis Cluster.** Every key of one sequence must sit in one slot: put a hash
tag in the prefix (``prefix="sse:{app}:"``, one shard holds all channels), or
give ``shard_by`` (a channel -> group name function): each group gets its own
sequence, hash tag and shard. Ids are exact and ordered among the channels of
one group; across groups they are ordered by the shards' clocks only (see
docs/channels.md).

Works with Redis 6.2+ and Valkey.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import redis
    from redis import asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import EqualJitterBackoff, NoBackoff
    from redis.exceptions import (
        AskError,
        BusyLoadingError,
        ClusterDownError,
        MaxConnectionsError,
        RedisError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "RedisBroker needs the redis extra: pip install 'sse_handler[redis]'"
    ) from exc

from ..deadlines import Deadlines
from ..event import ServerSentEvent
from ..tasks import spawn
from . import BrokerUnavailableError, Delivery, Listener, Replay, body_frame
from . import redis_wire as wire
from .redis_batch import NodeConnections, ScriptBatch, closed_by_server
from .redis_wire import by_prefix, channel_key
from .silence import SilenceWatch

__all__ = ["RedisBroker", "by_prefix", "channel_key", "redacted_url"]

log = logging.getLogger("sse_handler.redis")

#: A malformed entry of one channel is logged at most this often (seconds).
_WARN_EVERY = 60.0


def redacted_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<the configured URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _not_sent(exc: BaseException) -> bool:
    """Did the command certainly not run: ``exc`` happened before it went out
    (connecting, or waiting for a pooled connection), or Redis refused it
    while loading its data (``-LOADING``, a ``ConnectionError`` in redis-py)?
    redis-py tells these apart only by message, but for those two and a
    cluster node out of connections (a ``MaxConnectionsError``, whose
    message is empty from redis-py 6 on)."""
    if isinstance(exc, MaxConnectionsError | BusyLoadingError):
        return True
    text = str(exc)
    return "connecting to" in text or text.startswith(
        ("Timeout connecting", "No connection available", "Too many connections")
    )


#: Pub/Sub messages the reader handles per turn of the event loop.
_MESSAGES_PER_TURN = 32


class _Reroute(Exception):
    """A cluster publish its shard's batch did not run: route it again."""


def _publishing_cluster() -> dict[str, Any]:
    """The settings of the ``RedisCluster`` that publishes: its own retries
    off (``retry`` from redis-py 6 on, ``cluster_error_retry_attempts``
    before, deprecated since 6). Before 6, also no re-read of the layout
    every fifth ``MOVED``: redis-py 5 re-reads it by disconnecting every
    node, which cuts the publishes out on every shard (a burst routed again
    after a slot moved failed 6 of 60, "may have run"); each ``MOVED``
    still updates its slot."""
    if int(redis.__version__.split(".")[0]) >= 6:
        return {"retry": Retry(NoBackoff(), 0)}
    return {"cluster_error_retry_attempts": 0, "reinitialize_steps": 0}


async def _disconnect(node: Any) -> None:
    """Close the connections of a redis-py ``ClusterNode``; never raises."""
    try:
        await node.disconnect()
    except Exception as exc:  # a broken connection is closed all the same
        log.debug("Closing the connections to %s: %r", node.name, exc)


def _unconfirmed(ack: asyncio.Future[None]) -> None:
    if not ack.done():
        ack.set_exception(TimeoutError("Redis did not confirm the SUBSCRIBE in time"))


def _cursor_reset(cursor: wire.Position, snapshots: list[_Snapshot]) -> str | None:
    """Why the histories of a client's groups cannot honour its cursor, if they cannot.

    One id is a cursor over every group the client reads, yet came from one of
    them: a group that published last before it, or never, is not a reason
    for a reset. The cursor is from another history only when no group ever
    published here, or it is past every group's newest id. It is older than
    a group's history when that history began after it: the group's shard
    lost its data meanwhile, or the group is new -- which the group alone
    cannot tell apart, so both get ``history_exceeded``, never a silent gap.
    """
    known = [s for s in snapshots if s.last is not None and s.since is not None]
    if not known or cursor > max(s.last for s in known if s.last is not None):
        return "unknown_id"
    if cursor > (0, 0) and any(s.since is not None and cursor < s.since for s in known):
        return "history_exceeded"  # 0-0 asks for all there is
    return None


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
    server has closed before it is used (see
    :func:`~sse_handler.brokers.redis_batch.closed_by_server`)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get: Any = super().get_connection  # untyped in redis-py
        connection = await get(*args, **kwargs)
        if not closed_by_server(connection):
            return connection
        try:
            await connection.disconnect()
            await connection.connect()
        except BaseException:
            await self.release(connection)
            raise
        return connection


GapListener = Callable[[str], None]


@dataclass(slots=True)
class _ReplayBatch:
    """A replay read not started yet, and what it will answer."""

    result: asyncio.Future[Replay]


@dataclass(slots=True)
class _Snapshot:
    """What the read script returned for one group."""

    last: wire.Position | None
    since: wire.Position | None
    #: Per channel: the id of its newest event, and its entries from the start
    #: asked for (or why they could not be read).
    channels: list[tuple[wire.Position | None, list[Any] | str]]


class RedisBroker:
    """Channels on Redis: Pub/Sub for live events, Streams for history.

    ``url`` as redis-py takes it (``redis://host:6379/0``). ``history_size``
    entries per channel (approximate trimming, so a few more may stay) and
    ``history_age`` seconds (0 = no age bound) are kept for replay.
    ``block`` is the longest the reader waits for a message before it checks
    its connection with a ``PING``, which must come back within ``timeout``
    (or the reader reconnects and reads what it missed from the streams);
    ``timeout`` bounds every command, so that a Redis that hangs (paused,
    partitioned) makes ``publish`` fail with :class:`BrokerUnavailableError`
    instead of waiting.

    Connections: publishes use a pool of at most ``max_connections``, and
    reads (subscribe, replay) another one of the same size; the Pub/Sub
    reader has one of its own. A command that finds its pool busy waits for a
    connection, up to ``pool_timeout`` seconds (default: ``timeout``), then
    fails with :class:`BrokerUnavailableError` (``published=False``). Reads
    are retried ``retries`` times with backoff on a connection error or a
    timeout; a publish only when it certainly did not reach Redis (connecting
    failed), so an event is never stored twice. Connections that Redis closed
    (a restart) are replaced before a command is sent on them; a read
    connection idle for ``health_check_interval`` seconds is checked with a
    ``PING``.

    ``shard_by`` (for Redis Cluster) maps a channel to its group: each group
    has its own sequence and hash tag. ``reader_healthy``, ``reader_error``,
    ``reader_restarts`` and ``malformed_entries`` tell how the reader is doing
    (see ``docs/channels.md``).
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
        shard_by: Callable[[str], str] | None = None,
        cluster: bool = False,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if cluster and shard_by is None and not wire.hash_tag(prefix):
            raise ValueError(
                "On a Redis Cluster the keys of one sequence must share a slot: put a hash "
                "tag in the prefix (prefix='sse:{app}:') or give shard_by"
            )
        if shard_by is not None and ("{" in prefix or "}" in prefix):
            raise ValueError(
                "shard_by gives each group its own hash tag: the prefix must not hold one"
            )
        self.url = url
        self._where = redacted_url(url)
        self.prefix = prefix
        self.history_size = history_size
        self.history_age = history_age
        self.block = block
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.max_connections = max_connections
        self.pool_timeout = timeout if pool_timeout is None else pool_timeout
        self.retries = retries
        self.shard_by = shard_by
        # RESP2, for the same replies from every redis-py version (>= 8
        # speaks RESP3 by default).
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        self.cluster = cluster
        self._batch: ScriptBatch | None = None
        #: On a cluster, the publishes' batches of each shard, by node (a
        #: node replaced by a topology refresh gets a batch of its own).
        self._shard_batches: dict[str, tuple[Any, ScriptBatch]] = {}
        #: The batches of nodes redis-py replaced or dropped, with their
        #: nodes, until their calls out are answered (see _retire_gone_nodes).
        self._old_batches: list[tuple[Any, ScriptBatch]] = []
        if cluster:
            # redis-py routes each command (and each script, by its first
            # key) to the shard of its slot, with a pool per node.
            self._redis: Any = aioredis.RedisCluster.from_url(
                url, max_connections=max_connections, **common
            )
            # Its own retries are off: redis-py sends a command again after a
            # timeout or a lost connection, when it may have run, and the
            # event would be stored twice. _run_script tries again only what
            # never left.
            self._publish_redis: Any = aioredis.RedisCluster.from_url(
                url, max_connections=max_connections, **_publishing_cluster(), **common
            )
        else:
            read_pool = _Pool.from_url(
                url,
                max_connections=max_connections,
                timeout=self.pool_timeout,
                health_check_interval=health_check_interval,
                retry=Retry(EqualJitterBackoff(cap=max_backoff, base=0.05), retries),
                **common,
            )
            self._redis = aioredis.Redis.from_pool(read_pool)
            # No automatic retry for a publish: a command that failed after it
            # was sent may have run, and running it again would store the
            # event twice.
            publish_pool = _Pool.from_url(
                url, max_connections=max_connections, timeout=self.pool_timeout, **common
            )
            self._publish_redis = aioredis.Redis.from_pool(publish_pool)
            # Concurrent publishes leave together (redis_batch): the same
            # promises as one command each, for two thirds of the CPU with 8
            # racing and two fifths with 64 (docs/benchmarks.md, notes).
            self._batch = ScriptBatch(
                publish_pool,
                wire.PUBLISH_SCRIPT,
                failure=functools.partial(_unavailable, self._where),
                not_sent=_not_sent,
                retries=retries,
                max_backoff=max_backoff,
            )
        self._script: Any = self._publish_redis.register_script(wire.PUBLISH_SCRIPT)
        self._read_script: Any = self._redis.register_script(wire.READ_SCRIPT)
        # The Pub/Sub reader gets a connection of its own; on a cluster, to
        # the node of the URL: a PUBLISH reaches the subscribers of every node.
        # Its reads wait without a timeout (the watch PINGs a silent
        # connection), except on redis-py releases whose blocking Pub/Sub
        # read falls back to socket_timeout: longer than the watch takes.
        self._reader_redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=block + 2 * timeout,
            socket_connect_timeout=timeout,
            protocol=2,
        )
        self._pubsub: Any = None
        self._listeners: list[Listener] = []
        self._gap_listeners: list[GapListener] = []
        #: Subscribed channel -> its Pub/Sub channel, and back.
        self._topics: dict[str, bytes] = {}
        self._channels: dict[bytes, str] = {}
        #: The sequence's last id when each channel was subscribed: a catch-up
        #: never reads further back than that.
        self._floors: dict[str, wire.Position] = {}
        # The reads of a group's last id in flight (see _group_floor).
        self._floor_reads: dict[str, asyncio.Task[Any]] = {}
        #: Group of each subscribed channel ("" without shard_by).
        self._groups: dict[str, str] = {}
        #: The newest position delivered, per group: Pub/Sub delivers in the
        #: sequence's order, so everything up to it has been seen.
        self._seen: dict[str, wire.Position] = {}
        #: Subscriptions not confirmed yet, and what waits for them; each
        #: fails if Redis has not confirmed it within timeout + block.
        self._acks: dict[bytes, asyncio.Future[None]] = {}
        self._ack_deadlines = Deadlines(_unconfirmed, self._acks.values)
        #: Channels to send the next SUBSCRIBE for, and the task sending it.
        self._outgoing: list[bytes] = []
        self._sending: asyncio.Future[Any] | None = None
        #: Replays not started yet, by (channels, cursor): a client asking for
        #: the same joins (see replay()); and how many may read at once.
        self._replays: dict[tuple[tuple[str, ...], str], _ReplayBatch] = {}
        self._replay_slots = asyncio.Semaphore(max_connections)
        #: On a cluster, the publishes routed again through redis-py wait for
        #: one of these: a redis-py node raises at once past its
        #: ``max_connections``, and a whole batch answered MOVED is routed
        #: again at the same moment.
        self._reroute_slots = asyncio.Semaphore(max_connections)
        #: While catching up after a reconnect: topics still to be confirmed
        #: and the messages that arrived meanwhile.
        self._resyncing = False
        self._unconfirmed: set[bytes] = set()
        self._held: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        #: When a malformed entry of a channel was last logged.
        self._warned: dict[str, float] = {}
        self._reader: asyncio.Future[Any] | None = None
        #: PINGs the Pub/Sub connection after ``block`` s of silence; no
        #: answer within ``timeout`` fails the read.
        self._silence = SilenceWatch(block, timeout, self._ping)
        self._pruning: dict[str, asyncio.Future[Any]] = {}
        self._closed = False
        self._healthy = True
        self._error: str | None = None
        #: While the reader cannot reach Redis: since when, and when it last said so.
        self._down_since: float | None = None
        self._down_logged = 0.0
        #: Times the supervisor restarted the reader after an unexpected error.
        self.reader_restarts = 0
        #: Entries and messages skipped because sse_handler did not write them.
        self.malformed_entries = 0

    # ------------------------------------------------------------ health

    @property
    def reader_healthy(self) -> bool:
        """``False`` from a failed read until the reader has caught up again."""
        return self._healthy

    @property
    def reader_error(self) -> str | None:
        """Why the reader is unhealthy (``None`` while it is healthy)."""
        return None if self._healthy else self._error

    def _read_failed(self, exc: BaseException) -> None:
        self._healthy = False
        self._error = f"{type(exc).__name__}: {exc}"

    def _log_read_failure(self, exc: BaseException) -> None:
        """One WARNING when the reader loses Redis, a summary a minute while it
        stays away (it retries every ``max_backoff`` seconds at most)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self._down_logged = now
            log.warning(
                "The Redis reader of %s lost Redis (%s); retrying, with backoff up to %.1f s",
                self._where,
                exc,
                self.max_backoff,
            )
        elif now - self._down_logged >= _WARN_EVERY:
            self._down_logged = now
            log.warning(
                "The Redis reader of %s still cannot reach Redis after %.0f s (%s)",
                self._where,
                now - self._down_since,
                exc,
            )

    def _read_recovered(self) -> None:
        self._healthy = True
        if self._down_since is not None:
            log.warning(
                "The Redis reader of %s is back after %.0f s",
                self._where,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    # ------------------------------------------------------------ keys

    def group(self, channel: str) -> str:
        """The group of ``channel``: whose sequence orders its ids."""
        return "" if self.shard_by is None else self.shard_by(channel)

    def _base(self, group: str) -> str:
        if self.shard_by is None:
            return self.prefix
        # An empty tag ("{}") would hash the whole key: "%" stands for the
        # empty group (a "%" of a name is always escaped, so nothing clashes).
        return f"{self.prefix}{{{wire.escaped(group) or '%'}}}"

    def stream_key(self, channel: str) -> str:
        """The Redis key of ``channel``'s stream."""
        return channel_key(self._base(self.group(channel)), channel)

    def _index_key(self, channel: str) -> str:
        return channel_key(self._base(self.group(channel)), channel, "i")

    def _sequence_key(self, group: str) -> str:
        return self._base(group) + "s:"

    def _topic(self, channel: str) -> bytes:
        return channel_key(self.prefix, channel, "p").encode()

    # ------------------------------------------------------------ publish

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_gap_listener(self, listener: GapListener) -> None:
        """Call ``listener(channel)`` when live events of a subscribed channel
        were lost and the history cannot fill the gap: its local subscribers
        should resume by ``Last-Event-ID`` (and will get a ``reset``)."""
        self._gap_listeners.append(listener)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        body = event.encode()
        group = self.group(channel)
        keys = [
            self._sequence_key(group),
            self.stream_key(channel),
            self._index_key(channel),
        ]
        args = [
            channel,
            body,
            self.history_size,
            event.id or "",
            int(self.history_age * 1000),
            self._topic(channel),
        ]
        if self._batch is not None:
            reply = await self._batch.run(keys, args)
            entry, indexed = wire.text(reply[0]), int(reply[1])
        else:
            entry, indexed = await self._publish_on_shard(keys, args)
        crowded = event.id is not None and indexed > 2 * self.history_size + 256
        if crowded and channel not in self._pruning:
            self._pruning[channel] = spawn(
                self._prune_index(channel), f"pruning the id hash of {channel!r}"
            )
        return event.id if event.id is not None else entry

    async def _publish_on_shard(self, keys: list[str], args: list[Any]) -> tuple[str, int]:
        """A publish on a cluster: in the batches of its shard, as on one
        Redis; through redis-py's routing when that shard's node moved the
        slot or could not be reached (the call never ran), which also makes
        redis-py read the cluster's layout again."""
        cluster = self._publish_redis
        try:
            await cluster.initialize()  # the slots' layout, read once
            node = cluster.get_node_from_key(keys[0])
        except (RedisError, OSError):
            return await self._reroute(keys, args)
        known = self._shard_batches.get(node.name)
        if known is None or known[0] is not node:
            self._retire_gone_nodes(cluster)
            batch = ScriptBatch(
                NodeConnections(node),
                wire.PUBLISH_SCRIPT,
                failure=self._shard_failure,
                not_sent=_not_sent,
                retries=0,  # tried again through redis-py's routing instead
                max_backoff=self.max_backoff,
            )
            known = self._shard_batches[node.name] = (node, batch)
        try:
            reply = await known[1].run(keys, args)
        except _Reroute:
            return await self._reroute(keys, args)
        return wire.text(reply[0]), int(reply[1])

    async def _reroute(self, keys: list[str], args: list[Any]) -> tuple[str, int]:
        async with self._reroute_slots:
            return await self._run_script(keys, args)

    def _retire_gone_nodes(self, cluster: Any) -> None:
        """Retire the batches of nodes that redis-py no longer has: replaced
        (before redis-py 6, at every read of the layout) or gone from the
        layout. Their calls out finish there; then the connections they put
        back on those nodes are closed, as redis-py no longer knows them."""
        for name, (node, batch) in list(self._shard_batches.items()):
            if cluster.get_node(node_name=name) is not node:
                del self._shard_batches[name]
                batch.retire()
                self._old_batches.append((node, batch))
        keep = []
        for node, batch in self._old_batches:
            if batch.finished:
                spawn(_disconnect(node), f"closing the connections to {node.name}")
            else:
                keep.append((node, batch))
        self._old_batches = keep

    def _shard_failure(self, exc: BaseException) -> Exception:
        # MOVED, ASK, TRYAGAIN, CLUSTERDOWN: the node did not run the call.
        if isinstance(exc, AskError | TryAgainError | ClusterDownError) or _not_sent(exc):
            return _Reroute(str(exc))
        return _unavailable(self._where, exc)

    async def _run_script(self, keys: list[str], args: list[Any]) -> tuple[str, int]:
        backoff = 0.05
        for attempt in range(self.retries + 1):
            try:
                entry, indexed = await self._script(keys=keys, args=args)
                return wire.text(entry), int(indexed)
            except (RedisError, OSError) as exc:
                # Connecting failed, or no connection was free: the command
                # never left. Anything else may have reached Redis, and is
                # not sent again.
                if attempt == self.retries or not _not_sent(exc):
                    raise _unavailable(self._where, exc) from exc
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _prune_index(self, channel: str) -> None:
        """Drop the ids whose entries were trimmed away from the channel's stream.

        The hash grows by one field per publish with an id of the publisher's;
        this runs when it holds about twice ``history_size``, so its cost per
        publish stays constant.
        """
        index = self._index_key(channel)
        try:
            first = await self._redis.xrange(self.stream_key(channel), count=1)
            oldest = wire.position(wire.text(first[0][0])) if first else None
            stale: list[bytes] = []
            async for field, value in self._redis.hscan_iter(index, count=1000):
                position = wire.position(wire.text(value))
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
        if channel in self._topics:
            return
        group = self.group(channel)
        topic = self._topic(channel)
        # A catch-up after a reconnect need not read further back than what
        # was published before this call: the newest event the reader has
        # delivered, or (when it has delivered none of the group) the
        # sequence's last id now.
        floor = self._seen.get(group)
        if floor is None:
            floor = await self._group_floor(group)
        self._floors[channel] = floor
        self._groups[channel] = group
        self._topics[channel] = topic
        self._channels[topic] = channel
        loop = asyncio.get_running_loop()
        ack = self._acks[topic] = loop.create_future()
        self._ack_deadlines.add(loop.time() + self.timeout + self.block, ack)
        if self._reader is None:
            self._reader = spawn(self._supervise(), f"the Redis reader of {self._where}")
        try:
            if self._pubsub is not None:
                self._outgoing.append(topic)
                if self._sending is None:
                    self._sending = spawn(self._send_subscribes(), "sending SUBSCRIBE")
            self._wake.set()
            # Confirmed once Redis sends the reader its "subscribe" reply:
            # from then on every publish reaches this process. (Awaited
            # directly: only this call waits for it, and a cancelled wait
            # forgets the channel below.)
            await ack
        except (RedisError, OSError, TimeoutError) as exc:
            self._forget(channel)
            raise _unavailable(self._where, exc) from exc
        except BaseException:
            self._forget(channel)
            raise

    async def _group_floor(self, group: str) -> wire.Position:
        """The last id of ``group``'s sequence, read once for all the
        subscribes that want it meanwhile (a burst of streams on channels of
        their own wants it once per stream). A read begun a moment before a
        subscribe gives a floor at most that much older: a catch-up then
        reads that little further back, as it would for a slower SUBSCRIBE."""
        reading = self._floor_reads.get(group)
        if reading is None:
            reading = asyncio.get_running_loop().create_task(
                self._redis.hget(self._sequence_key(group), "last")
            )
            self._floor_reads[group] = reading
            reading.add_done_callback(functools.partial(self._floor_read, group))
        try:
            # Shielded: a subscribe that is cancelled leaves the read to the others.
            last = await asyncio.shield(reading)
        except (RedisError, OSError) as exc:
            raise _unavailable(self._where, exc) from exc
        return (last and wire.position(wire.text(last))) or (0, 0)

    def _floor_read(self, group: str, reading: asyncio.Task[Any]) -> None:
        if self._floor_reads.get(group) is reading:
            del self._floor_reads[group]
        if not reading.cancelled():
            reading.exception()  # retrieved: each subscribe raises its own error

    async def _send_subscribes(self) -> None:
        """One ``SUBSCRIBE`` for the channels subscribe() queued meanwhile (a
        reconnect storm subscribes thousands in a few loop turns)."""
        try:
            await asyncio.sleep(0)
            while self._outgoing:
                batch = [t for t in self._outgoing if t in self._channels]
                self._outgoing = []
                pubsub = self._pubsub
                if pubsub is None or not batch:
                    continue  # a connection that opens subscribes every wanted channel
                try:
                    await pubsub.subscribe(*batch)
                except Exception as exc:
                    if pubsub is not self._pubsub:
                        continue  # replaced meanwhile: the new one subscribes them
                    failure = _unavailable(self._where, exc)
                    for topic in batch:
                        ack = self._acks.get(topic)
                        if ack is not None and not ack.done():
                            ack.set_exception(failure)
        finally:
            self._sending = None

    async def unsubscribe(self, channel: str) -> None:
        topic = self._topics.get(channel)
        if topic is None:
            return
        self._forget(channel)
        pubsub = self._pubsub
        if pubsub is None or self._closed:
            return
        try:
            await pubsub.unsubscribe(topic)
        except Exception:
            # Failed, or the connection was closed or replaced under it: a
            # reconnect subscribes only what is still wanted, and a message
            # of a channel no longer wanted is skipped. Nothing to report.
            log.debug("UNSUBSCRIBE %r failed", topic, exc_info=True)

    def _forget(self, channel: str) -> None:
        topic = self._topics.pop(channel, None)
        if topic is not None:
            self._channels.pop(topic, None)
            ack = self._acks.pop(topic, None)
            if ack is not None and not ack.done():
                ack.cancel()
            self._unconfirmed.discard(topic)
        self._floors.pop(channel, None)
        self._groups.pop(channel, None)
        self._warned.pop(channel, None)

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
                await self._drop_pubsub()
            await asyncio.sleep(backoff)
            # A reader that ran for a while starts again from the shortest wait.
            ran_long = time.monotonic() - started > 10 * self.max_backoff
            backoff = 0.05 if ran_long else min(backoff * 2, self.max_backoff)

    async def _read_loop(self) -> None:
        backoff = 0.05
        read = 0
        watch = self._silence
        while not self._closed:
            if not self._topics:
                # Nothing to read: wait for a subscription.
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._pubsub is None:
                    await self._open_pubsub()
                    watch.start()
                # No timeout per read (redis-py's costs as much as the read):
                # the watch PINGs a silent connection and cuts the read when
                # no answer comes (see silence.py).
                watch.listening = True
                try:
                    message = await self._pubsub.get_message(timeout=None)
                except asyncio.CancelledError:
                    if watch.cut():
                        raise RedisTimeoutError(
                            f"the Pub/Sub connection did not answer a PING within {self.timeout} s"
                        ) from None
                    raise
                finally:
                    watch.listening = False
                watch.heard_at = time.monotonic()
                if message is None:
                    continue
                await self._on_message(message)
                read += 1
                if read >= _MESSAGES_PER_TURN:
                    # Buffered messages are read without a wait; a burst
                    # (the confirmations of thousands of new channels, each
                    # waking a stream's registration) would otherwise take
                    # the loop for as long as it lasts.
                    read = 0
                    await asyncio.sleep(0)
            except (RedisError, OSError) as exc:
                self._read_failed(exc)
                self._log_read_failure(exc)
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05

    def _ping(self) -> None:
        pubsub = self._pubsub
        if pubsub is not None:
            spawn(self._send_ping(pubsub), "the Redis reader's PING")

    async def _send_ping(self, pubsub: Any) -> None:
        # Written on the connection as it is, never connecting it: the
        # reader's own read may be reconnecting that very connection (redis-py
        # does so in its retry), and two connects of one connection leak
        # sockets and fail either task.
        connection = pubsub.connection
        if pubsub is not self._pubsub or connection is None or not connection.is_connected:
            return
        try:
            await connection.send_command("PING", check_health=False)
        except Exception as exc:
            # The read fails as well, or the watch cuts it: reported there.
            log.debug("PING on the Pub/Sub connection of %s failed: %r", self._where, exc)

    async def _open_pubsub(self) -> None:
        """A new Pub/Sub connection subscribed to every channel wanted now;
        after a failure, what was missed is read from the streams once Redis
        has confirmed them all."""
        pubsub = self._reader_redis.pubsub()
        topics = list(self._channels)
        self._resyncing = bool(self._seen) or self._healthy is False
        self._unconfirmed = set(topics)
        self._held = []
        try:
            await pubsub.subscribe(*topics)
            # Channels subscribe() registered while that went out: it saw no
            # connection, so they are this one's to subscribe. No await
            # between the last check and publishing the connection.
            sent = set(topics)
            while missing := [t for t in self._channels if t not in sent]:
                self._unconfirmed.update(missing)
                await pubsub.subscribe(*missing)
                sent.update(missing)
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def _drop_pubsub(self) -> None:
        self._silence.stop()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        topic: bytes = message.get("channel", b"")
        if kind == "subscribe":
            ack = self._acks.pop(topic, None)
            if ack is not None and not ack.done():
                ack.set_result(None)
            self._unconfirmed.discard(topic)
            if self._resyncing and not self._unconfirmed:
                await self._catch_up()
            elif not self._resyncing:
                self._read_recovered()
            return
        if kind != "message":
            return
        channel = self._channels.get(topic)
        if channel is None:
            return  # unsubscribed meanwhile
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        if self._resyncing:
            self._held.append((channel, data))
            return
        delivery = self._message_delivery(channel, data)
        if delivery is not None:
            self._live(delivery)

    def _live(self, delivery: Delivery) -> None:
        group = self._groups.get(delivery.channel, "")
        seen = self._seen.get(group)
        if seen is not None and delivery.position <= seen:
            return  # delivered already, by a catch-up
        # The cursor moves first: an event that fails is not delivered again.
        self._seen[group] = delivery.position
        self._deliver(delivery)

    async def _catch_up(self) -> None:
        """Deliver, in id order, what the subscribed channels got while the
        Pub/Sub connection was away; then what arrived during the catch-up."""
        by_group: dict[str, list[str]] = {}
        for channel, group in self._groups.items():
            by_group.setdefault(group, []).append(channel)
        found: list[Delivery] = []
        for group, channels in by_group.items():
            seen = self._seen.get(group, (0, 0))
            starts = [max(seen, self._floors.get(c, (0, 0))) for c in channels]
            snapshot = await self._read(group, channels, [wire.after(p) or p for p in starts])
            found.extend(self._caught_up(channels, starts, snapshot))
        found.sort(key=lambda delivery: delivery.position)
        held, self._held = self._held, []
        self._resyncing = False
        for delivery in found:
            self._live(delivery)
        for channel, data in held:
            if channel in self._topics:
                message_delivery = self._message_delivery(channel, data)
                if message_delivery is not None:
                    self._live(message_delivery)
        self._read_recovered()

    def _caught_up(
        self, channels: list[str], starts: list[wire.Position], snapshot: _Snapshot
    ) -> list[Delivery]:
        """What a catch-up read found, minus the channels whose gap the
        history cannot fill (their subscribers are told)."""
        since = snapshot.since
        found: list[Delivery] = []
        for channel, start, (newest, entries) in zip(
            channels, starts, snapshot.channels, strict=True
        ):
            if isinstance(entries, str):
                self._malformed(channel, "-", f"its stream cannot be read ({entries})")
                continue
            deliveries = self._entries(channel, entries)
            # The history restarted after what this process had seen (Redis
            # lost its data), the entry before the first one read was trimmed,
            # or the stream is gone although the channel had newer events.
            lost = start != (0, 0) and (since is None or since > start)
            lost = lost or bool(deliveries and deliveries[0][1] > start)
            lost = lost or (not deliveries and newest is not None and newest > start)
            if lost:
                self._gap(channel)
                continue
            found.extend(delivery for delivery, _ in deliveries)
        return found

    async def _read(
        self, group: str, channels: list[str], firsts: list[wire.Position]
    ) -> _Snapshot:
        """The read script over ``channels`` of ``group``, from ``firsts`` on."""
        keys = [self._sequence_key(group), *(self.stream_key(c) for c in channels)]
        args: list[str] = []
        for channel, first in zip(channels, firsts, strict=True):
            args += [channel, wire.entry_id(first)]
        reply = await self._read_script(keys=keys, args=args)
        last, since = (wire.position(wire.text(v)) if v is not None else None for v in reply[:2])
        out: list[tuple[wire.Position | None, list[Any] | str]] = []
        for newest, entries in zip(reply[2::2], reply[3::2], strict=True):
            if isinstance(entries, bytes | str):
                out.append(
                    (wire.position(wire.text(newest)) if newest else None, wire.text(entries))
                )
                continue
            pairs = [(entry_id, wire.fields(flat)) for entry_id, flat in entries]
            out.append((wire.position(wire.text(newest)) if newest else None, pairs))
        return _Snapshot(last, since, out)

    def _gap(self, channel: str) -> None:
        log.warning(
            "Events of channel %r were lost while the Redis reader of %s was away, and the "
            "history no longer holds them: its local subscribers resume by Last-Event-ID",
            channel,
            self._where,
        )
        for listener in self._gap_listeners:
            try:
                listener(channel)
            except Exception:
                log.exception("Uncaught exception in a broker gap listener")

    def _message_delivery(self, channel: str, data: bytes) -> Delivery | None:
        """The delivery of one Pub/Sub message (``id\\ncaller id\\nbody``)."""
        entry_id, _, rest = data.partition(b"\n")
        caller, sep, body = rest.partition(b"\n")
        if not sep:
            self._malformed(channel, entry_id.decode(errors="replace"), "not our message format")
            return None
        fields = {b"b": body}
        if caller:
            fields[b"i"] = caller
        return self._delivery(channel, entry_id.decode(errors="replace"), fields)

    def _entries(self, channel: str, entries: Any) -> list[tuple[Delivery, wire.Position]]:
        """Stream entries as deliveries, each with the id of the channel's
        event before it (``(0, 0)`` when it was the first)."""
        out: list[tuple[Delivery, wire.Position]] = []
        for entry_id, fields in entries:
            delivery = self._delivery(channel, wire.text(entry_id), fields)
            if delivery is None:
                continue
            prev = fields.get(b"p") if isinstance(fields, dict) else None
            before = (prev and wire.position(wire.text(prev))) or (0, 0)
            out.append((delivery, before))
        return out

    def _delivery(self, channel: str, entry_id: str, fields: Any) -> Delivery | None:
        """The delivery of one entry; ``None`` (and a warning) for an entry
        that sse_handler did not write."""
        body = fields.get(b"b") if isinstance(fields, dict) else None
        caller = fields.get(b"i") if isinstance(fields, dict) else None
        position = wire.position(entry_id)
        event_id = entry_id
        problem = None
        if not isinstance(body, bytes):
            problem = "no body field"
        elif not wire.is_frame(body):
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
        if problem is not None or not isinstance(body, bytes) or position is None:
            self._malformed(channel, entry_id, problem or "no body field")
            return None
        frame = body_frame(event_id, body, caller is not None)
        return Delivery(channel, event_id, position, frame)

    def _malformed(self, channel: str, entry_id: str, problem: str) -> None:
        self.malformed_entries += 1
        now = time.monotonic()
        last = self._warned.get(channel)
        if last is None or now - last > _WARN_EVERY:
            self._warned[channel] = now
            log.warning(
                "Skipped malformed entry %s of channel %r (Redis stream %r): %s; "
                "was it written by another program? (%d malformed entries so far; "
                "this channel is logged at most every %.0f s)",
                entry_id,
                channel,
                self.stream_key(channel),
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

    def position(self, event_id: str) -> wire.Position | None:
        return wire.position(event_id)

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        """The events of ``channels`` after ``last_event_id``.

        Reads wait for one of ``max_connections`` slots; while a read waits,
        another client asking for the same channels and cursor joins it (a
        reconnect storm: thousands with the same few cursors), so one read
        answers them all. A read starts only after every client that joined
        had subscribed: none misses what was published in between.
        """
        key = (tuple(sorted(set(channels))), last_event_id)
        batch = self._replays.get(key)
        if batch is None:
            batch = self._replays[key] = _ReplayBatch(asyncio.get_running_loop().create_future())
            spawn(self._run_replay(key, batch), "a replay")
        return await asyncio.shield(batch.result)

    async def _run_replay(self, key: tuple[tuple[str, ...], str], batch: _ReplayBatch) -> None:
        try:
            async with self._replay_slots:
                if self._replays.get(key) is batch:
                    del self._replays[key]  # started: later clients start their own
                replay = await self._replay(list(key[0]), key[1])
        except BaseException as exc:
            self._replays.pop(key, None) if self._replays.get(key) is batch else None
            if not batch.result.done():
                batch.result.set_exception(exc)
                batch.result.exception()  # retrieved, even when no one waits any more
            if not isinstance(exc, Exception):
                raise
            return
        batch.result.set_result(replay)

    async def _replay(self, channels: list[str], last_event_id: str) -> Replay:
        by_group: dict[str, list[str]] = {}
        for channel in channels:
            by_group.setdefault(self.group(channel), []).append(channel)
        if not by_group:
            return Replay()
        try:
            cursor = wire.position(last_event_id)
            if cursor is None:
                cursor = await self._caller_id_position(list(channels), last_event_id)
                if cursor is None:
                    return Replay(reset="unknown_id")
            first = wire.after(cursor)
            if first is None:
                return Replay(reset="unknown_id")  # past the largest id there can be
            snapshots = {
                group: (members, await self._read(group, members, [first] * len(members)))
                for group, members in by_group.items()
            }
        except (RedisError, OSError) as exc:
            raise _unavailable(self._where, exc) from exc
        reset = _cursor_reset(cursor, [snapshot for _, snapshot in snapshots.values()])
        if reset is not None:
            return Replay(reset=reset)
        found: list[Delivery] = []
        for members, snapshot in snapshots.values():
            replay = self._replayed(members, snapshot, cursor)
            if replay.reset is not None:
                return replay
            found.extend(replay.deliveries)
        if len(channels) > 1:
            found.sort(key=lambda delivery: delivery.position)
        return Replay(found, after=cursor)

    def _replayed(self, channels: list[str], snapshot: _Snapshot, cursor: wire.Position) -> Replay:
        """The events after ``cursor`` in one group's snapshot, or a reset
        when a channel's stream no longer holds them."""
        found: list[Delivery] = []
        for channel, (newest, entries) in zip(channels, snapshot.channels, strict=True):
            if newest is None or newest <= cursor:
                continue  # nothing after the cursor
            if isinstance(entries, str):
                log.warning(
                    "Redis key %r of channel %r is not a stream (%s): skipped in a replay",
                    self.stream_key(channel),
                    channel,
                    entries,
                )
                continue
            deliveries = self._entries(channel, entries)
            if not deliveries or deliveries[0][1] > cursor:
                # The channel had events after the cursor that its stream no
                # longer holds (trimmed, expired or evicted).
                return Replay(reset="history_exceeded")
            found.extend(delivery for delivery, _ in deliveries)
        return Replay(found)

    async def _caller_id_position(
        self, channels: Sequence[str], event_id: str
    ) -> wire.Position | None:
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
            if isinstance(entry, bytes) and (position := wire.position(entry.decode())) is not None
        ]
        return min(positions, default=None)

    # ------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop the reader and release the connections; never raises (a
        process shutting down must get to its exit)."""
        self._closed = True
        self._ack_deadlines.cancel()
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(BrokerUnavailableError("the broker is closing"))
                ack.exception()  # retrieved: its subscriber may be gone already
        shards = [*self._old_batches, *self._shard_batches.values()]
        batches = [batch for _, batch in shards]
        for batch in [*batches, self._batch] if self._batch is not None else batches:
            await batch.close()
        for node, _ in shards:
            # A node redis-py dropped keeps the connections its batch put
            # back; redis-py's own close reaches only the nodes it still has.
            await _disconnect(node)
        for task in [self._reader, self._sending, *self._pruning.values()]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        for step in (
            self._drop_pubsub,
            self._reader_redis.aclose,
            self._redis.aclose,
            self._publish_redis.aclose,
        ):
            try:
                await step()
            except Exception as exc:
                log.warning("Closing the Redis broker of %s: %r", self._where, exc)
