"""Stream tickets: single-use, short-lived, stored where every process can take them.

``EventSource`` cannot send headers, and a long-lived token in a URL ends up in
proxy logs and the browser's history. A ticket is the URL-safe alternative: a
random string (256 bits) that an authenticated request obtains and a stream
request spends, once, within seconds. What it grants (a
:class:`~sse_handler.grant.Grant`: subject, channel patterns, the expiry of
the credential it was issued against) lives in a :class:`TicketStore`:

* :class:`MemoryTickets`: a dict of this process (a deployment of one process).
* :class:`RedisTickets`: Redis, shared by every process of a deployment;
  taking is ``GETDEL`` (Redis 6.2+, Valkey), atomic, so two processes given the
  same ticket cannot both accept it. Keys hold the ticket's SHA-256, never the
  ticket: what Redis holds cannot be replayed.

:func:`tickets_for` picks the store that matches a handler's broker.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Protocol

from ..brokers import BrokerUnavailableError
from ..grant import Grant

__all__ = [
    "MAX_TICKET_TTL",
    "MemoryTickets",
    "RedisTickets",
    "TicketStore",
    "decode_grant",
    "encode_grant",
    "tickets_for",
]

#: The longest lifetime a ticket may be given, in seconds: a ticket is spent
#: by the page that asked for it, within moments.
MAX_TICKET_TTL = 300.0


class TicketStore(Protocol):
    """Where tickets wait to be taken. ``take`` must be atomic: one taker only.

    A store that cannot be reached raises
    :class:`~sse_handler.brokers.BrokerUnavailableError` (the stream gets 503).
    """

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds."""

    async def take(self, key: str) -> bytes | None:
        """Remove and return the value under ``key``; ``None`` if absent or expired."""

    async def close(self) -> None:
        """Release what the store holds (connections)."""


class PeekableTicketStore(TicketStore, Protocol):
    """A store that can also read a ticket without taking it (for ``HEAD``)."""

    async def peek(self, key: str) -> bytes | None:
        """The value under ``key``, left in place; ``None`` if absent or expired."""


def ticket_key(ticket: str) -> str:
    """The key a ticket is stored under: its SHA-256, hex."""
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


def encode_grant(grant: Grant) -> bytes:
    return json.dumps(
        {
            "sub": grant.subject,
            "read": list(grant.read.patterns),
            "publish": list(grant.publish.patterns),
            "exp": grant.expires_at,
        },
        separators=(",", ":"),
    ).encode()


def decode_grant(value: bytes) -> Grant:
    fields = json.loads(value)
    return Grant(
        fields["read"], subject=fields["sub"], publish=fields["publish"], expires_at=fields["exp"]
    )


class MemoryTickets:
    """Tickets in this process: enough when one process serves every stream."""

    def __init__(self) -> None:
        self._tickets: dict[str, tuple[float, bytes]] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._tickets)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            # Tickets nobody spent: dropped at most once a second, not per request.
            self._tickets = {k: v for k, v in self._tickets.items() if v[0] > now}
            self._next_sweep = now + 1.0
        self._tickets[key] = (now + ttl, value)

    async def take(self, key: str) -> bytes | None:
        entry = self._tickets.pop(key, None)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def peek(self, key: str) -> bytes | None:
        entry = self._tickets.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def close(self) -> None:
        self._tickets.clear()


class RedisTickets:
    """Tickets in Redis (6.2+) or Valkey, shared by every process that uses the same server.

    ``url`` and ``prefix`` are usually the broker's (:func:`tickets_for`); with
    ``cluster`` the URL names a node of a Redis Cluster. The client is this
    store's own (redis-py's asyncio client), opened on first use.
    """

    def __init__(self, url: str, *, prefix: str = "sse:", cluster: bool = False) -> None:
        self.url = url
        self.prefix = prefix + "ticket:"
        self.cluster = cluster
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            try:
                from redis import asyncio as aioredis
            except ImportError:
                raise ImportError(
                    "RedisTickets needs redis-py: pip install 'sse_handler[redis]'"
                ) from None
            factory = aioredis.RedisCluster if self.cluster else aioredis.Redis
            self._client = factory.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
        return self._client

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self._redis().set(self.prefix + key, value, px=max(1, round(ttl * 1000)))
        except (OSError, _redis_error()) as exc:
            raise BrokerUnavailableError(f"cannot store a ticket: {exc}") from None

    async def take(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis().getdel(self.prefix + key)
        except (OSError, _redis_error()) as exc:
            raise BrokerUnavailableError(f"cannot take a ticket: {exc}") from None
        return value

    async def peek(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis().get(self.prefix + key)
        except (OSError, _redis_error()) as exc:
            raise BrokerUnavailableError(f"cannot read a ticket: {exc}") from None
        return value

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _redis_error() -> type[Exception]:
    from redis.exceptions import RedisError

    return RedisError


def tickets_for(broker: object) -> TicketStore:
    """The store for a handler's broker: Redis when the broker is a
    :class:`~sse_handler.brokers.redis.RedisBroker` (its ``url``, ``prefix``
    and ``cluster``, read through any view that forwards them), else memory."""
    url = getattr(broker, "url", None)
    if isinstance(url, str):
        prefix = getattr(broker, "prefix", "sse:")
        return RedisTickets(url, prefix=prefix, cluster=bool(getattr(broker, "cluster", False)))
    return MemoryTickets()
