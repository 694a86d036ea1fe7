"""Deployment-wide admin operations and presence: the control plane.

A handler's ``connection_ids()``, ``send_one()`` and ``stop_one()`` see the
connections of its own process. Behind several processes that is a part of
the clients, so the handler also has a :class:`ControlPlane`
(``handler.cluster``), shared by every handler of one broker in a process,
whose operations reach every process of the deployment:

``await cluster.connections()``
    every connection of every process, as :class:`ClusterConnection` (with ``process``)
``await cluster.connection(cid)``
    one of them, or ``None``
``await cluster.send_one(cid, event)``
    ``True`` if some process had ``cid``
``await cluster.stop_one(cid, farewell, retry)``
    ``True`` if some process had ``cid``; it gets the farewell and hint, then closes
``await cluster.stop_subject(subject, ...)``
    how many connections of ``subject`` (a user's tabs on every process) were stopped
``await cluster.presence(channel)``
    who reads ``channel`` now: :class:`PresenceEntry` (cid, subject, process, since)
``await cluster.subjects(channel)``
    the same rolled up per subject (:class:`SubjectPresence`)

This module's :class:`ControlPlane` is the plane of the memory broker: one
process, so every operation is a direct call on the attached handlers.
Over a :class:`~sse_handler.brokers.redis.RedisBroker` the handler gets a
:class:`~sse_handler.brokers.redis_control.RedisControlPlane` instead, which
asks the other processes over Redis Pub/Sub and keeps presence in Redis.
Either way an operation first looks in its own process, and one that finds its
target there (``send_one``, ``stop_one``, ``connection``) asks nobody else.

The subject of a connection is the authenticated user id,
``conn.subject`` (``None`` when the stream is anonymous); see
:func:`subject_of`.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, Unpack

from .brokers import Broker, BrokerUnavailableError
from .errors import ConnectionClosedError, UnknownConnectionError
from .event import EventFields, ServerSentEvent, encode_retry, event_frame
from .lifecycle import CloseReason
from .tasks import log, spawn

if TYPE_CHECKING:
    from .connection import ServerSentEventConnection

__all__ = [
    "ClusterConnection",
    "ControlPlane",
    "PresenceEntry",
    "Registry",
    "SubjectPresence",
    "control_plane_for",
    "process_name",
    "roll_up",
    "sorted_presence",
    "subject_of",
]

#: The name of the event that join and leave announcements are sent as.
PRESENCE_EVENT = "presence"


def subject_of(conn: Any) -> str | None:
    """The authenticated user id of ``conn`` (``conn.subject``), or ``None``.

    Read through ``getattr``: a connection class without the attribute is
    anonymous. Only a non-empty ``str`` counts.
    """
    subject = getattr(conn, "subject", None)
    return subject if isinstance(subject, str) and subject else None


def process_name() -> str:
    """A name for this process, unique in a deployment: ``<host>:<pid>:<random>``
    (the random part tells a restarted process from the one before it)."""
    host = socket.gethostname().replace(" ", "_") or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class ClusterConnection:
    """One connection of some process, as the deployment-wide listing shows it:
    the fields of :class:`~sse_handler.connection.ConnectionStats`, plus the
    ``process`` that holds it and its ``subject``."""

    cid: str
    process: str
    subject: str | None
    channels: list[str]
    remote_ip: str | None
    connected_at: float
    queue_depth: int
    events_sent: int
    path: str
    last_event_id: str | None
    state: str
    queued_bytes: int
    bytes_sent: int
    dropped: int

    @classmethod
    def of(cls, conn: ServerSentEventConnection, process: str) -> ClusterConnection:
        return cls(process=process, subject=subject_of(conn), **asdict(conn.stats()))

    @classmethod
    def from_dict(cls, data: Any) -> ClusterConnection | None:
        """From another process's answer; ``None`` when it is not one.

        Fields this version does not know are ignored and missing ones refused,
        so processes of neighbouring releases can answer each other.
        """
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except KeyError:
            return None


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One connection reading a channel: who (``subject``), where, since when
    (``since``: the connection's ``connected_at``, epoch seconds)."""

    cid: str
    subject: str | None
    process: str
    since: float


@dataclass(frozen=True, slots=True)
class SubjectPresence:
    """One subject reading a channel: online while any of its connections is."""

    subject: str
    #: How many of its connections read the channel.
    connections: int
    processes: list[str]
    #: The earliest ``since`` of its connections.
    since: float


def roll_up(entries: Iterable[PresenceEntry]) -> list[SubjectPresence]:
    """Presence per subject, sorted by subject; anonymous connections are left out."""
    by_subject: dict[str, list[PresenceEntry]] = {}
    for entry in entries:
        if entry.subject is not None:
            by_subject.setdefault(entry.subject, []).append(entry)
    return [
        SubjectPresence(
            subject=subject,
            connections=len(mine),
            processes=sorted({e.process for e in mine}),
            since=min(e.since for e in mine),
        )
        for subject, mine in sorted(by_subject.items())
    ]


class Registry(Protocol):
    """What the plane needs of a handler (or of anything listing connections)."""

    def connections(self) -> list[ServerSentEventConnection]: ...

    def get_connection(self, cid: str) -> ServerSentEventConnection:
        """The connection ``cid``; raises :class:`~sse_handler.errors.UnknownConnectionError`."""
        ...


class ControlPlane:
    """Deployment-wide operations and presence; in one process (memory broker).

    Handlers :meth:`attach` themselves (a handler does so when it is built)
    and tell the plane which channels their registered connections read
    (:meth:`track`, :meth:`update`, :meth:`untrack`). ``presence_events``
    publishes ``event: presence`` with data ``{"action": "join" | "leave",
    "cid", "subject", "process", "since"}`` into a channel when a connection
    starts or stops reading it (off by default: each one is a publish).

    Subclasses reach other processes by overriding :meth:`ask_others` and
    keep presence elsewhere by overriding :meth:`presence` and the
    ``stored_*`` methods.
    """

    def __init__(
        self,
        broker: Broker | None = None,
        *,
        process: str | None = None,
        presence_events: bool = False,
    ) -> None:
        if process is not None and (not process or any(c.isspace() for c in process)):
            raise ValueError("process must be a non-empty name without whitespace")
        #: This process's name in listings and presence.
        self.process = process or process_name()
        #: Where join and leave announcements are published.
        self.broker = broker
        self.presence_events = presence_events
        self._registries: list[Registry] = []
        #: Registered connections and the channels announced for each.
        self._tracked: dict[str, tuple[ServerSentEventConnection, tuple[str, ...]]] = {}
        #: channel -> cid -> connection, for this process's connections (each
        #: entry is made when it is asked for: most never are).
        self._rosters: dict[str, dict[str, ServerSentEventConnection]] = {}
        #: Operations started here, by name (``list``, ``get``, ``send``,
        #: ``stop``, ``stop_subject``, ``presence``).
        self.operations: Counter[str] = Counter()
        #: Requests of other processes answered here, by operation.
        self.served: Counter[str] = Counter()
        #: Processes that did not answer an operation in time, summed.
        self.unanswered = 0
        self._closed = False

    # ----------------------------------------------------------- handlers

    def attach(self, registry: Registry) -> None:
        """Serve the connections of ``registry`` (a handler) too."""
        if registry not in self._registries:
            self._registries.append(registry)

    async def detach(self, registry: Registry) -> None:
        """Stop serving ``registry``; the last one to leave closes the plane."""
        if registry in self._registries:
            self._registries.remove(registry)
            if not self._registries:
                await self.close()

    def track(self, conn: ServerSentEventConnection) -> None:
        """``conn`` is registered: it is present in its channels from now on."""
        # The channels it was announced in: a tuple (most streams have one
        # channel; a set costs 216 bytes even then).
        self._tracked[conn.cid] = (conn, ())
        self.update(conn)

    def update(self, conn: ServerSentEventConnection) -> None:
        """``conn``'s channels changed: follow them (no-op before :meth:`track`)."""
        tracked = self._tracked.get(conn.cid)
        if tracked is None or tracked[0] is not conn:
            return
        announced = tracked[1]
        if len(announced) == len(conn.channels) and conn.channels.issuperset(announced):
            return
        now = tuple(sorted(conn.channels))
        self._tracked[conn.cid] = (conn, now)
        for channel in now:
            if channel not in announced:
                self._join(conn, channel)
        for channel in announced:
            if channel not in conn.channels:
                self._leave(conn, channel)

    def untrack(self, conn: ServerSentEventConnection) -> None:
        """``conn`` has ended: it leaves every channel's presence at once."""
        tracked = self._tracked.get(conn.cid)
        if tracked is None or tracked[0] is not conn:
            return
        del self._tracked[conn.cid]
        for channel in tracked[1]:
            self._leave(conn, channel)

    def presence_count(self) -> int:
        """Connection-channel pairs of this process present now."""
        return sum(len(roster) for roster in self._rosters.values())

    def presence_entry(self, conn: ServerSentEventConnection) -> PresenceEntry:
        """``conn`` as an entry of this process's presence."""
        return PresenceEntry(conn.cid, subject_of(conn), self.process, conn.connected_at)

    def _stores(self) -> bool:
        """Are joins and leaves stored (``stored_*`` overridden or set on the
        plane)? Then they need their entries."""
        return (
            getattr(self.stored_join, "__func__", None) is not ControlPlane.stored_join
            or getattr(self.stored_leave, "__func__", None) is not ControlPlane.stored_leave
        )

    def _join(self, conn: ServerSentEventConnection, channel: str) -> None:
        self._rosters.setdefault(channel, {})[conn.cid] = conn
        if self.presence_events or self._stores():
            entry = self.presence_entry(conn)
            self.stored_join(channel, entry)
            self._announce(channel, "join", entry)

    def _leave(self, conn: ServerSentEventConnection, channel: str) -> None:
        roster = self._rosters.get(channel, {})
        present = roster.pop(conn.cid, None)
        if not roster:
            self._rosters.pop(channel, None)
        if present is not None and (self.presence_events or self._stores()):
            entry = self.presence_entry(present)
            self.stored_leave(channel, entry)
            self._announce(channel, "leave", entry)

    def stored_join(self, channel: str, entry: PresenceEntry) -> None:
        """Where a subclass stores presence: ``entry`` joined ``channel``."""

    def stored_leave(self, channel: str, entry: PresenceEntry) -> None:
        """Where a subclass stores presence: ``entry`` left ``channel``."""

    def _announce(self, channel: str, action: str, entry: PresenceEntry) -> None:
        if not self.presence_events or self.broker is None or self._closed:
            return
        event = ServerSentEvent(event=PRESENCE_EVENT, data={"action": action, **asdict(entry)})
        spawn(self._publish(channel, event), f"presence {action} in {channel!r}")

    async def _publish(self, channel: str, event: ServerSentEvent) -> None:
        assert self.broker is not None
        try:
            await self.broker.publish(channel, event)
        except BrokerUnavailableError as exc:
            log.warning("Presence event for channel %r not published: %s", channel, exc)

    # --------------------------------------------------------- operations

    async def connections(self) -> list[ClusterConnection]:
        """Every connection of every process that answered in time."""
        self.operations["list"] += 1
        answers = [self.run_local("list", {}), *await self._ask("list", {}, first_found=False)]
        found = [
            conn
            for answer in answers
            if isinstance(answer, list)
            for item in answer
            if (conn := ClusterConnection.from_dict(item)) is not None
        ]
        return sorted(found, key=lambda c: (c.process, c.connected_at, c.cid))

    async def connection(self, cid: str) -> ClusterConnection | None:
        """The connection ``cid`` wherever it lives, or ``None``."""
        return ClusterConnection.from_dict(await self._first_found("get", {"cid": cid}))

    async def send_one(
        self, cid: str, event: ServerSentEvent | None = None, /, **fields: Unpack[EventFields]
    ) -> bool:
        """Send one event to the connection ``cid`` wherever it lives; whether
        some process had it (and it was still open)."""
        frame = event_frame(event, fields).decode("utf-8", "surrogateescape")
        return bool(await self._first_found("send", {"cid": cid, "frame": frame}))

    async def stop_one(
        self, cid: str, farewell: ServerSentEvent | None = None, retry: int | None = None
    ) -> bool:
        """Stop the connection ``cid`` wherever it lives, after the optional
        farewell and ``retry`` hint (as :meth:`ServerSentEventConnection.stop`);
        whether some process had it."""
        args = {"cid": cid, "last": _last_frame(farewell, retry)}
        return bool(await self._first_found("stop", args))

    async def stop_subject(
        self, subject: str, farewell: ServerSentEvent | None = None, retry: int | None = None
    ) -> int:
        """Stop every connection of ``subject`` in every process (logout, ban),
        each after the optional farewell and hint; how many were stopped."""
        self.operations["stop_subject"] += 1
        args = {"subject": subject, "last": _last_frame(farewell, retry)}
        answers = [self.run_local("stop_subject", args)]
        answers += await self._ask("stop_subject", args, first_found=False)
        return sum(a for a in answers if isinstance(a, int) and not isinstance(a, bool))

    async def presence(self, channel: str) -> list[PresenceEntry]:
        """Who reads ``channel`` now, across the processes (oldest first)."""
        self.operations["presence"] += 1
        roster = self._rosters.get(channel, {})
        return sorted_presence(self.presence_entry(conn) for conn in roster.values())

    async def subjects(self, channel: str) -> list[SubjectPresence]:
        """:meth:`presence` per subject: online while any of its connections is."""
        return roll_up(await self.presence(channel))

    async def _first_found(self, op: str, args: dict[str, Any]) -> Any:
        self.operations[op] += 1
        local = self.run_local(op, args)
        if local:
            return local
        for answer in await self._ask(op, args, first_found=True):
            if answer:
                return answer
        return local

    async def _ask(self, op: str, args: dict[str, Any], *, first_found: bool) -> list[Any]:
        return await self.ask_others(op, args, first_found=first_found)

    async def ask_others(self, op: str, args: dict[str, Any], *, first_found: bool) -> list[Any]:
        """The answers of the other processes to ``op`` (none in one process).

        With ``first_found`` the caller needs one truthy answer, and may be
        given it before every process has answered.
        """
        return []

    def run_local(self, op: str, args: dict[str, Any]) -> Any:
        """Run one operation on this process's connections; JSON in, JSON out
        (the same for a request of this process and of another)."""
        if op == "list":
            return [asdict(ClusterConnection.of(c, self.process)) for c in self._connections()]
        if op == "stop_subject":
            subject = args.get("subject")
            last = _frame_arg(args.get("last"))
            stopped = 0
            for mine in self._connections():
                if subject_of(mine) == subject and mine.is_active:
                    mine.writer.stop(CloseReason.STOPPED, last)
                    stopped += 1
            return stopped
        conn = self._find(args.get("cid"))
        if conn is None:
            return None if op == "get" else False
        if op == "get":
            return asdict(ClusterConnection.of(conn, self.process))
        if op == "send":
            try:
                conn.send_encoded(_frame_arg(args.get("frame")))
            except ConnectionClosedError:
                return False
            return True
        if op == "stop":
            conn.writer.stop(CloseReason.STOPPED, _frame_arg(args.get("last")))
            return True
        raise ValueError(f"unknown operation {op!r}")

    def _connections(self) -> list[ServerSentEventConnection]:
        return [conn for registry in self._registries for conn in registry.connections()]

    def _find(self, cid: Any) -> ServerSentEventConnection | None:
        if not isinstance(cid, str):
            return None
        for registry in self._registries:
            try:
                return registry.get_connection(cid)
            except UnknownConnectionError:
                continue
        return None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    async def start(self) -> None:
        """Be reachable before the first connection (a server calls this when
        it starts): in one process there is nothing to start."""

    async def close(self) -> None:
        """Stop background work (none here); idempotent."""
        self._closed = True


def _last_frame(farewell: ServerSentEvent | None, retry: int | None) -> str:
    """What a stopped connection receives last, as text that JSON can carry."""
    last = (encode_retry(retry) if retry is not None else b"") + (
        farewell.encode() if farewell is not None else b""
    )
    return last.decode("utf-8", "surrogateescape")


def _frame_arg(value: Any) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else b""


def sorted_presence(entries: Iterable[PresenceEntry]) -> list[PresenceEntry]:
    """Presence entries oldest first (then by process and cid)."""
    return sorted(entries, key=lambda e: (e.since, e.process, e.cid))


_planes: weakref.WeakKeyDictionary[Any, ControlPlane] = weakref.WeakKeyDictionary()


def control_plane_for(broker: Broker) -> ControlPlane:
    """The control plane of ``broker`` in this process, made once per broker.

    A broker that brings its own plane has a ``control_plane()`` method; a
    :class:`~sse_handler.brokers.redis.RedisBroker` gets a
    :class:`~sse_handler.brokers.redis_control.RedisControlPlane` with its
    defaults (build one yourself, and pass it as the handler's ``cluster``
    setting, to change them); any other broker, one :class:`ControlPlane`.
    """
    plane: ControlPlane | None
    try:
        plane = _planes.get(broker)
    except TypeError:
        plane = None
    if plane is not None and not plane.closed:
        return plane
    own = getattr(broker, "control_plane", None)
    redis = sys.modules.get("sse_handler.brokers.redis")  # loaded if a RedisBroker exists
    if callable(own):
        plane = own()
    elif redis is not None and isinstance(broker, redis.RedisBroker):
        from .brokers.redis_control import RedisControlPlane

        plane = RedisControlPlane.for_broker(broker)
    else:
        plane = ControlPlane(broker)
    try:
        _planes[broker] = plane
    except TypeError:  # not weakly referenceable: one plane per handler
        pass
    return plane
