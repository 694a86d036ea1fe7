"""The control plane over Redis: deployment-wide operations and presence.

A :class:`RedisControlPlane` is what a handler over a
:class:`~sse_handler.brokers.redis.RedisBroker` gets as ``handler.cluster``
(see :mod:`sse_handler.cluster` for the operations). It opens its own Redis
clients from the broker's ``url`` and ``prefix``, and uses, beside the
broker's keys (``c:``, ``i:``, ``s:``, ``p:``)::

    <prefix>h:            sorted set: process -> its last heartbeat (Redis's clock, ms)
    <prefix>r:<channel>   hash: "<process> <cid>" -> {"subject", "since"} (JSON):
                          who reads the channel
    <prefix>q:            Pub/Sub channel: requests, read by every process
    <prefix>a:<process>   Pub/Sub channel: the answers to one process's requests

(``<channel>`` and ``<process>`` percent-encoded as the broker encodes
channel names.)

**Live processes.** Every ``presence_ttl / 3`` seconds (default 5 s) a
process puts its heartbeat in ``h:``; a process whose last heartbeat is older
than ``presence_ttl`` (default 15 s) is dead: no operation waits for it, its
presence entries are not listed (and are deleted by the next reader), and its
heartbeat is dropped. So a crashed process's connections leave presence at
most ``presence_ttl`` seconds after it died. A process that ends cleanly
(:meth:`RedisControlPlane.close`, which the last handler's ``shutdown()``
calls) removes its entries and its heartbeat at once. A process whose
heartbeat Redis lost (a restart without its data) or took for dead (a pause
longer than ``presence_ttl``) writes its presence again at its next heartbeat.

**Presence** changes are written by one background task, coalesced
(``HSET`` for a join, ``HDEL`` for a leave), right after they happen; while
Redis is away they are retried, with backoff. Each heartbeat also renews the
expiry of the hashes of the channels the process is present in (twice
``presence_ttl``), so the hash of a channel whose readers all died goes away
by itself.

**Requests.** An operation that must ask the other processes reads the live
processes, publishes ``{"id", "from", "op", "args"}`` on ``q:``, and
collects the answers on its own ``a:`` channel until every live process has
answered (or, for an operation on one cid, one of them has found it), for at
most ``timeout`` seconds (default 2 s): a process that does not answer in
time is left out of the result, counted in ``unanswered`` and logged. An
operation first looks in its own process and asks nobody when it finds its
target there. When Redis cannot be reached an operation raises
:class:`~sse_handler.brokers.BrokerUnavailableError`. A process runs each
request once, by its id, even one published twice.

Tested on one Redis (6.2, 7) and Valkey 8; ``cluster=True`` sends the
commands through a Redis Cluster client, but no test covers a Cluster yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..cluster import ControlPlane, PresenceEntry, sorted_presence
from ..tasks import cancel, spawn
from . import BrokerUnavailableError
from .redis import RedisBroker, channel_key, redacted_url

__all__ = ["RedisControlPlane"]

#: Channels whose presence one pipeline writes (see RedisControlPlane._write).
_CHANNELS_PER_WRITE = 64

log = logging.getLogger("sse_handler.redis")

#: The operations another process may ask for.
_OPERATIONS = frozenset({"list", "get", "send", "stop", "stop_subject"})
#: How many request ids a process remembers to run each request once.
_RECENT_REQUESTS = 4096

# One heartbeat (ARGV[2] a process) or a read of the live processes (ARGV[2]
# empty), on Redis's clock: processes older than ARGV[1] ms are dropped.
# Returns {ms since the process's previous heartbeat, or -1; live processes}.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gap = -1
if ARGV[2] ~= '' then
  local prev = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if prev then gap = now - tonumber(prev) end
  redis.call('ZADD', KEYS[1], now, ARGV[2])
end
local oldest = string.format('%d', now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. oldest)
return {gap, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""


# The presence changes of several channels' rosters in one call (one
# Redis only: a Cluster needs every key of a call in one slot). KEYS: the
# rosters. ARGV[1]: the TTL in ms; then, for each key in turn, a count n of
# fields to set, n name/value pairs, a count m of fields to delete, m names.
# Set or deleted in chunks: unpack() takes a few thousand values at most.
_PRESENCE = """
local function chunked(command, key, first, last)
  local at = first
  while at <= last do
    local stop = math.min(at + 3999, last)
    redis.call(command, key, unpack(ARGV, at, stop))
    at = stop + 1
  end
end
local ttl = ARGV[1]
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  chunked('HSET', KEYS[k], i + 1, i + 2 * n)
  i = i + 1 + 2 * n
  local m = tonumber(ARGV[i])
  chunked('HDEL', KEYS[k], i + 1, i + m)
  i = i + 1 + m
  if n > 0 then redis.call('PEXPIRE', KEYS[k], ttl) end
end
return #KEYS
"""


@dataclass(slots=True)
class _Answers:
    """The answers to one request, as they come in."""

    expected: set[str]
    first_found: bool
    by_process: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, process: str, result: Any) -> None:
        self.by_process[process] = result
        if (self.first_found and result) or self.expected <= self.by_process.keys():
            self.done.set()


class RedisControlPlane(ControlPlane):
    """Deployment-wide operations and presence through Redis (see the module).

    ``presence_ttl`` bounds how long a crashed process stays listed (seconds;
    heartbeats every third of it); ``timeout`` bounds how long an operation
    waits for the other processes' answers. Build one from a broker with
    :meth:`for_broker`.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "sse:",
        cluster: bool = False,
        broker: Any = None,
        process: str | None = None,
        timeout: float = 2.0,
        presence_ttl: float = 15.0,
        presence_events: bool = False,
    ) -> None:
        super().__init__(broker, process=process, presence_events=presence_events)
        if not timeout > 0 or not presence_ttl > 0:
            raise ValueError("timeout and presence_ttl must be positive")
        self.url = url
        self._where = redacted_url(url)
        self.prefix = prefix
        self.timeout = timeout
        self.presence_ttl = presence_ttl
        #: Seconds between two heartbeats.
        self.heartbeat = presence_ttl / 3
        #: The live processes as the last heartbeat or request saw them.
        self.live_processes: list[str] = []
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        client = aioredis.RedisCluster if cluster else aioredis.Redis
        self._redis: Any = client.from_url(url, **common)
        # Pub/Sub waits for messages: no socket timeout on its reads.
        self._pubsub_redis: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=timeout, protocol=2
        )
        self._beat_script: Any = self._redis.register_script(_BEAT)
        self._cluster = cluster
        self._presence_script: Any = self._redis.register_script(_PRESENCE)
        self._processes = f"{prefix}h:"
        self._requests = f"{prefix}q:".encode()
        self._answers = channel_key(prefix, self.process, "a").encode()
        self._pending: dict[str, _Answers] = {}
        #: The ids of the last requests run, oldest first: redis-py sends a
        #: command again when its connection broke after it went out, so a
        #: request may arrive twice, and must run once.
        self._recent: dict[str, None] = {}
        #: Presence changes not yet written: (channel, field) -> value, None = delete.
        self._dirty: dict[tuple[str, str], str | None] = {}
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()  # subscribed to requests and answers
        self._beaten = asyncio.Event()  # a first heartbeat went in
        self._tasks: list[asyncio.Future[Any]] = []
        self._failing: set[str] = set()

    @classmethod
    def for_broker(cls, broker: RedisBroker, **settings: Any) -> RedisControlPlane:
        """The plane of ``broker``'s Redis and prefix; ``settings`` as the constructor's."""
        return cls(
            broker.url, prefix=broker.prefix, cluster=broker.cluster, broker=broker, **settings
        )

    # ------------------------------------------------------------ running

    async def start(self, timeout: float | None = None) -> None:
        """Run the heartbeat and the request listener now, and wait (up to
        ``timeout``, default the operations' timeout) until both are in
        place: otherwise they start with the first connection, and a request
        sent meanwhile would not reach this process."""
        self._ensure_running()
        try:
            await asyncio.wait_for(
                asyncio.gather(self._ready.wait(), self._beaten.wait()),
                self.timeout if timeout is None else timeout,
            )
        except TimeoutError:
            pass  # Redis is slow or away: the tasks go on retrying

    def _ensure_running(self) -> None:
        if not self._tasks and not self.closed:
            self._tasks = [
                spawn(self._supervise(), "the control plane's Pub/Sub reader"),
                spawn(self._beat_loop(), "the control plane's heartbeat"),
                spawn(self._write_loop(), "the control plane's presence writer"),
            ]

    def _failed(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            log.warning("Control plane: %s failed at %s: %s", what, self._where, exc)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.warning("Control plane: %s works again at %s", what, self._where)

    async def _beat(self, beating: bool) -> int:
        """One heartbeat (or a read of the live processes); the gap since the last one."""
        process = self.process if beating else ""
        gap, live = await self._beat_script(
            keys=[self._processes], args=[int(self.presence_ttl * 1000), process]
        )
        self.live_processes = sorted(p.decode() if isinstance(p, bytes) else p for p in live)
        return int(gap)

    async def _beat_loop(self) -> None:
        ttl_ms = self.presence_ttl * 1000
        while not self.closed:
            try:
                gap = await self._beat(beating=True)
                if gap < 0 or gap > ttl_ms:
                    # New, or taken for dead meanwhile: (re)write all of it.
                    for channel, roster in self._rosters.items():
                        for conn in roster.values():
                            self.stored_join(channel, self.presence_entry(conn))
                self._beaten.set()
                await self._renew(list(self._rosters))
                self._recovered("the heartbeat")
            except (RedisError, OSError) as exc:
                self._failed("the heartbeat", exc)
            await asyncio.sleep(self.heartbeat)

    async def _renew(self, channels: list[str]) -> None:
        if not channels:
            return
        ttl_ms = int(self.presence_ttl * 2000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.pexpire(self._roster_key(channel), ttl_ms)
            await pipe.execute()

    async def _supervise(self) -> None:
        backoff = 0.05
        while not self.closed:
            pubsub = self._pubsub_redis.pubsub()
            try:
                await self._subscribe(pubsub)
                self._ready.set()
                self._recovered("Pub/Sub")
                backoff = 0.05
                while not self.closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message.get("channel"), message.get("data"))
            except (RedisError, OSError) as exc:
                self._failed("Pub/Sub", exc)
            finally:
                self._ready.clear()
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _subscribe(self, pubsub: Any) -> None:
        """Subscribe to the requests and this process's answers; return once
        Redis has confirmed both (a request is only sent after that)."""
        await pubsub.subscribe(self._requests, self._answers)
        confirmed = 0
        while confirmed < 2:
            message = await pubsub.get_message(timeout=self.timeout)
            if message is None:
                raise RedisTimeoutError("no confirmation of the control subscriptions")
            if message.get("type") == "subscribe":
                confirmed += 1

    async def _write_loop(self) -> None:
        backoff = 0.05
        await self._beaten.wait()  # readers drop entries of processes with no heartbeat
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            if not batch:
                continue
            try:
                await self._write(batch)
                self._recovered("writing presence")
                backoff = 0.05
            except (RedisError, OSError) as exc:
                self._failed("writing presence", exc)
                for key, value in batch.items():
                    self._dirty.setdefault(key, value)  # a newer change wins
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()

    async def _write(self, batch: dict[tuple[str, str], str | None]) -> None:
        if not self._cluster:
            await self._write_by_script(batch)
            return
        # Grouped by channel: a batch of joins to one channel is one HSET and
        # one PEXPIRE, not two commands (and two replies to parse) per join.
        joins: dict[str, dict[str, str]] = {}
        leaves: dict[str, list[str]] = {}
        for (channel, name), value in batch.items():
            if value is None:
                leaves.setdefault(channel, []).append(name)
            else:
                joins.setdefault(channel, {})[name] = value
        ttl_ms = int(self.presence_ttl * 2000)
        ops: list[tuple[str, list[str] | dict[str, str]]] = [
            *leaves.items(),
            *joins.items(),
        ]
        # A few channels per round trip: thousands of per-user channels in one
        # pipeline would be packed, and their replies parsed, in one turn of
        # the loop, holding back every stream's events meanwhile.
        for start in range(0, len(ops), _CHANNELS_PER_WRITE):
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel, change in ops[start : start + _CHANNELS_PER_WRITE]:
                    key = self._roster_key(channel)
                    if isinstance(change, list):
                        pipe.hdel(key, *change)
                    else:
                        pipe.hset(key, mapping=change)
                        pipe.pexpire(key, ttl_ms)
                await pipe.execute()

    async def _write_by_script(self, batch: dict[tuple[str, str], str | None]) -> None:
        """The batch in one script call per 64 channels. Why: per-user
        channels make a join one channel of its own, and two commands per
        channel (HSET, PEXPIRE), each packed and its reply parsed by redis-py,
        cost more CPU than the rest of accepting the stream (docs/benchmarks.md,
        notes)."""
        changes: dict[str, tuple[list[str], list[str]]] = {}
        for (channel, name), value in batch.items():
            sets, deletes = changes.setdefault(channel, ([], []))
            if value is None:
                deletes.append(name)
            else:
                sets += (name, value)
        ttl_ms = int(self.presence_ttl * 2000)
        channels = list(changes.items())
        for start in range(0, len(channels), _CHANNELS_PER_WRITE):
            keys: list[str] = []
            args: list[str | int] = [ttl_ms]
            for channel, (sets, deletes) in channels[start : start + _CHANNELS_PER_WRITE]:
                keys.append(self._roster_key(channel))
                args += (len(sets) // 2, *sets, len(deletes), *deletes)
            await self._presence_script(keys=keys, args=args)

    # ------------------------------------------------------------ presence

    def _roster_key(self, channel: str) -> str:
        return channel_key(self.prefix, channel, "r")

    def stored_join(self, channel: str, entry: PresenceEntry) -> None:
        value = json.dumps({"subject": entry.subject, "since": entry.since})
        self._dirty[(channel, f"{self.process} {entry.cid}")] = value
        self._wake.set()
        self._ensure_running()

    def stored_leave(self, channel: str, entry: PresenceEntry) -> None:
        self._dirty[(channel, f"{self.process} {entry.cid}")] = None
        self._wake.set()

    async def presence(self, channel: str) -> list[PresenceEntry]:
        self.operations["presence"] += 1
        key = self._roster_key(channel)
        try:
            # The hash first: an entry in it was written after its process's
            # first heartbeat, so the live processes read next include it.
            raw = await self._redis.hgetall(key)
            await self._beat(beating=False)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailableError(f"Redis at {self._where} is unavailable: {exc}") from exc
        live = set(self.live_processes)
        entries: list[PresenceEntry] = []
        stale: list[bytes] = []
        for name, value in raw.items():
            entry = _entry(name, value)
            if entry is None or entry.process not in live:
                stale.append(name)
            else:
                entries.append(entry)
        if stale:
            try:
                await self._redis.hdel(key, *stale)
            except (RedisError, OSError):
                pass  # the next reader tries again
        return sorted_presence(entries)

    # ------------------------------------------------------------ requests

    async def ask_others(self, op: str, args: dict[str, Any], *, first_found: bool) -> list[Any]:
        self._ensure_running()
        request_id = secrets.token_hex(8)
        answers: _Answers | None = None
        try:
            async with asyncio.timeout(self.timeout):
                await self._ready.wait()
                await self._beat(beating=False)
                others = set(self.live_processes) - {self.process}
                if not others:
                    return []
                answers = self._pending[request_id] = _Answers(others, first_found)
                request = {"id": request_id, "from": self.process, "op": op, "args": args}
                await self._redis.publish(self._requests, json.dumps(request))
                await answers.done.wait()
        except TimeoutError:
            if answers is None:
                raise BrokerUnavailableError(
                    f"the control plane could not reach Redis at {self._where} "
                    f"within {self.timeout} s"
                ) from None
            missing = sorted(answers.expected - answers.by_process.keys())
            if missing and not (first_found and any(answers.by_process.values())):
                self.unanswered += len(missing)
                log.warning(
                    "Control plane: %s got no answer within %.1f s from %s",
                    op,
                    self.timeout,
                    ", ".join(missing),
                )
        except (RedisError, OSError) as exc:
            raise BrokerUnavailableError(f"Redis at {self._where} is unavailable: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
        assert answers is not None
        return list(answers.by_process.values())

    def _on_message(self, topic: Any, data: Any) -> None:
        try:
            message = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(message, dict):
            return
        if topic == self._answers:
            answers = self._pending.get(str(message.get("id")))
            process = message.get("process")
            if answers is not None and isinstance(process, str):
                answers.add(process, message.get("result"))
        elif topic == self._requests:
            self._on_request(message)

    def _on_request(self, message: dict[str, Any]) -> None:
        origin, op, args = message.get("from"), message.get("op"), message.get("args")
        request_id = message.get("id")
        if origin == self.process or not isinstance(origin, str) or op not in _OPERATIONS:
            return
        if not isinstance(args, dict) or not isinstance(request_id, str):
            return
        if request_id in self._recent:
            return
        self._recent[request_id] = None
        if len(self._recent) > _RECENT_REQUESTS:
            del self._recent[next(iter(self._recent))]
        try:
            result = self.run_local(str(op), args)
        except Exception:
            log.exception("Control plane: %s requested by %s failed", op, origin)
            result = None
        self.served[str(op)] += 1
        answer = json.dumps({"id": request_id, "process": self.process, "result": result})
        topic = channel_key(self.prefix, origin, "a")
        spawn(self._publish_answer(topic, answer), f"answering {op} of {origin}")

    async def _publish_answer(self, topic: str, answer: str) -> None:
        try:
            await self._redis.publish(topic, answer)
        except (RedisError, OSError) as exc:
            self._failed("answering a request", exc)

    # ------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop the background tasks, take this process's presence and
        heartbeat out of Redis, and close the clients; idempotent."""
        if self.closed:
            return
        await super().close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            cancel(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            await self._leave_redis()
        await self._pubsub_redis.aclose()
        await self._redis.aclose()

    async def _leave_redis(self) -> None:
        batch = dict(self._dirty)
        for channel, roster in self._rosters.items():
            for cid in roster:
                batch[(channel, f"{self.process} {cid}")] = None
        try:
            async with asyncio.timeout(self.timeout):
                await self._write({key: None for key in batch})
                await self._redis.zrem(self._processes, self.process)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "Control plane: could not remove this process's presence from %s (%s); "
                "it expires within %.0f s",
                self._where,
                exc,
                self.presence_ttl,
            )


def _entry(name: Any, value: Any) -> PresenceEntry | None:
    """A presence entry from its hash field and value, or ``None`` if malformed."""
    try:
        process, _, cid = name.decode().partition(" ")
        data = json.loads(value)
        subject, since = data["subject"], float(data["since"])
    except (AttributeError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None
    if not cid or not (subject is None or isinstance(subject, str)):
        return None
    return PresenceEntry(cid=cid, subject=subject, process=process, since=since)
