"""`ServerSentEventHandler`: one long-lived object per endpoint.

It owns the connection registry, mounts into a ``tornado.web.Application`` with
``handler.route(pattern)``, runs the per-handler keep-alive timer and offers the
admin operations (``send_all``, ``send_one``, ``stop_one``, ``stop_all``,
``shutdown``). Applications subclass it and override the hooks.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import math
import random
import secrets
import time
from collections.abc import Awaitable, Collection, Iterable
from typing import Any, ClassVar, TypedDict, Unpack

from tornado.httputil import HTTPHeaders, HTTPServerRequest

from .brokers import Broker, BrokerUnavailableError, Replay
from .brokers.memory import MemoryBroker
from .channels import ChannelRouter
from .cluster import ControlPlane, control_plane_for
from .coalesce import Coalescer
from .connection import ServerSentEventConnection
from .cors import CorsPolicy
from .deadlines import Deadlines
from .errors import ConnectionClosedError, UnknownConnectionError
from .event import EventFields, ServerSentEvent, as_event, comment_line, encode_retry, event_frame
from .grant import Grant
from .lifecycle import CloseReason, OverflowPolicy
from .outage import BrokerOutage
from .routing import EventStreamRoute
from .stats import EndpointStats, Snapshot
from .tasks import after_batch, in_task, log, start_soon, until_done
from .transport import ClosedTransport, SocketTransport
from .writer import Transport, WriteLimits, framed

__all__ = ["HandlerSettings", "ServerSentEventHandler"]

_KEEPALIVE = framed(comment_line())


class HandlerSettings(TypedDict, total=False):
    """The keyword arguments of :class:`ServerSentEventHandler` (its settings),
    so that a checker refuses ``keepalive="5"`` or a misspelt name."""

    connection_class: type[ServerSentEventConnection]
    keepalive: float
    write_timeout: float
    max_queue_messages: int
    max_queue_bytes: int
    overflow_policy: OverflowPolicy | str
    dead_peer_timeout: float
    kernel_buffer: int
    coalesce_window: float
    retry: int | None
    shutdown_farewell: ServerSentEvent | None
    auth_expired_farewell: ServerSentEvent | None
    reconnect_retry: tuple[int, int]
    broker: Broker | None
    cluster: ControlPlane | None
    default_channel: str
    max_connections: int
    max_connections_per_ip: int
    over_limit_status: int
    max_connection_age: float
    max_event_size: int
    max_last_event_id: int
    cors_origins: Collection[str]
    cors_credentials: bool
    kept_headers: Collection[str]


class ServerSentEventHandler:
    """The endpoint: registry, routing, lifecycle, keep-alive and limits.

    Every setting below is a class attribute that a subclass may override, or a
    keyword argument of the constructor (``ServerSentEventHandler(keepalive=5)``).
    A time of ``0`` turns that timer off.

    Mount it with ``Application([handler.route(r"/events")])``.
    """

    #: The connection class that :meth:`get_connection_impl` instantiates.
    connection_class: type[ServerSentEventConnection] = ServerSentEventConnection
    #: Seconds of silence after which a connection gets a ``:`` comment (0 = off).
    keepalive: float = 15.0
    #: Seconds a blocked write may wait for the client before the connection
    #: closes with reason ``slow`` (0 = wait forever).
    write_timeout: float = 30.0
    #: Queue bound per connection, in frames.
    max_queue_messages: int = 1000
    #: Queue bound per connection, in bytes.
    max_queue_bytes: int = 1 << 20
    #: What a full queue does: ``disconnect``, ``drop_oldest`` or ``drop_newest``.
    overflow_policy: OverflowPolicy = OverflowPolicy.DISCONNECT
    #: Seconds after which a peer that vanished without FIN is dropped, through
    #: TCP keepalive and TCP_USER_TIMEOUT (0 = the kernel's defaults).
    dead_peer_timeout: float = 60.0
    #: Bytes the kernel may hold unsent for one stream (TCP_NOTSENT_LOWAT; 0 =
    #: the kernel's autotuned buffer, megabytes). A frozen reader then holds at
    #: most ``max_queue_bytes`` plus this before the write deadline acts.
    kernel_buffer: int = 128 * 1024
    #: Seconds an event for a live connection may wait so that the events that
    #: reach that connection within them leave in one ``send`` (0 = off: each
    #: event is written at once). Adds up to this much latency to every event;
    #: saves sends only for connections that get several events per window
    #: (docs/backpressure.md, "Coalescing"). One timer per handler.
    coalesce_window: float = 0.0
    #: A ``retry:`` hint (ms) sent with the first comment of every stream.
    retry: int | None = None
    #: Sent by :meth:`shutdown` before closing, with a jittered retry hint.
    shutdown_farewell: ServerSentEvent | None = ServerSentEvent(event="shutdown", data="")
    #: Sent, with a jittered retry hint, to a stream whose credential expired
    #: (a :class:`~sse_handler.grant.Grant` with ``expires_at``) before it is
    #: closed with reason ``auth_expired``: the page renews its credential and
    #: resumes from its last event id (docs/authentication.md).
    auth_expired_farewell: ServerSentEvent | None = ServerSentEvent(event="auth_expired", data="")
    #: "Come back later" hints (shutdown, shedding over a limit, the maximum
    #: age, a broker that is down) are ``retry:`` values drawn from this range
    #: (ms), so that clients do not all reconnect in the same instant.
    reconnect_retry: tuple[int, int] = (1000, 5000)
    #: Connection cap of this endpoint, in all (0 = no cap).
    max_connections: int = 0
    #: Connection cap per client address (0 = no cap).
    max_connections_per_ip: int = 0
    #: The answer over a cap: 200 (a ``retry:`` hint and a close; browsers come
    #: back later), or 429 / 503 with ``Retry-After`` (browsers give up).
    over_limit_status: int = 200
    #: Seconds after which a connection is stopped with a retry hint, +/- 10 %
    #: so that clients rebalance across processes over time (0 = never).
    max_connection_age: float = 0.0
    #: Largest encoded event accepted by send()/send_all()/publish() (0 = any).
    max_event_size: int = 0
    #: A longer Last-Event-ID is not looked up: the client gets a reset.
    max_last_event_id: int = 256
    #: Origins that may open a stream from another site (``"*"`` for any,
    #: without credentials); empty: no CORS headers at all.
    cors_origins: Collection[str] = ()
    #: Allow cookies/credentials cross-origin (never with ``"*"``).
    cors_credentials: bool = False
    #: Where :meth:`publish` goes; ``None``: a :class:`MemoryBroker` of its own.
    broker: Broker | None = None
    #: Deployment-wide operations and presence (see :mod:`sse_handler.cluster`);
    #: ``None``: the plane of :attr:`broker` (shared by the handlers of one broker).
    cluster: ControlPlane | None = None
    #: The channel of a request that names none (see :meth:`channels_for`).
    default_channel: str = "default"
    #: Request headers a connection keeps once registered (all of them are
    #: there for ``authorize``, ``get_connection_impl`` and the registration
    #: hooks): a stream lives for hours, its request head need not.
    kept_headers: Collection[str] = ("User-Agent", "Origin", "Referer")

    _settings: ClassVar[frozenset[str]] = frozenset(HandlerSettings.__annotations__)

    #: Connections one housekeeping callback visits at most (see _housekeeping_tick):
    #: neighbours in the registry tend to be quiet in step, so a slice may be all
    #: keep-alive comments, 64 of them about 1.5 ms on the bench machine.
    _sweep_slice: ClassVar[int] = 64

    # The settings a connection's write path gets as its frozen WriteLimits.
    _write_settings: ClassVar[frozenset[str]] = frozenset(
        {
            "max_queue_messages",
            "max_queue_bytes",
            "overflow_policy",
            "write_timeout",
            "max_event_size",
        }
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "coalesce_window":
            value = _checked_window(value)
            if "_coalescer" in self.__dict__:
                # Connections that coalesce use the new window from now on;
                # whether a connection coalesces is decided when it is accepted.
                self._coalescer.window = value
        super().__setattr__(name, value)
        # A bound changed after construction (handler.write_timeout = 0.5):
        # connections accepted from now on get it.
        if name in self._write_settings and "write_limits" in self.__dict__:
            self.write_limits = self._limits()

    def _limits(self) -> WriteLimits:
        return WriteLimits(
            max_queue_messages=self.max_queue_messages,
            max_queue_bytes=self.max_queue_bytes,
            overflow_policy=OverflowPolicy(self.overflow_policy),
            write_timeout=self.write_timeout,
            max_event_size=self.max_event_size,
        )

    def __init__(self, **settings: Unpack[HandlerSettings]) -> None:
        for name, value in settings.items():
            if name not in self._settings:
                known = ", ".join(sorted(self._settings))
                raise TypeError(f"unknown setting {name!r}; known: {known}")
            setattr(self, name, value)
        self.overflow_policy = OverflowPolicy(self.overflow_policy)
        if self.retry is not None:
            encode_retry(self.retry)  # refuse a bad hint now, not at the first client
        if self.over_limit_status not in (200, 429, 503):
            raise ValueError("over_limit_status must be 200, 429 or 503")
        for name in ("cors_origins", "kept_headers"):
            if isinstance(getattr(self, name), str | bytes):
                raise TypeError(f"{name} must be a collection of strings, not a single string")
        self.cors = CorsPolicy(self.cors_origins, self.cors_credentials)
        # One window (one timer) for all the connections of this handler.
        self._coalescer = Coalescer(_checked_window(self.coalesce_window))
        #: The bounds a connection's write path gets when it is accepted (a
        #: frozen value, rebuilt when one of these settings is assigned).
        self.write_limits = self._limits()
        self._kept = frozenset(name.lower() for name in self.kept_headers)
        # Streams admitted (reserved at accept, before authorize()) per address
        # and in all; a slot is released exactly once (see release()).
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._admitted = 0
        self._connections: dict[str, ServerSentEventConnection] = {}
        #: Lifetime counters (see :meth:`stats`).
        self.counters = EndpointStats()
        if self.broker is None:
            self.broker = MemoryBroker()
        #: Channel subscriptions of this handler's connections, over its broker.
        self.router = ChannelRouter(self.broker)
        # Never None once built (the typed copy is for the handler's own use).
        self._cluster = self.cluster or control_plane_for(self.broker)
        self.cluster = self._cluster
        self._cluster.attach(self)
        #: Logs a broker outage once, with summaries, not once per stream.
        self.broker_outage = BrokerOutage(type(self).__name__)
        self._cid_prefix = secrets.token_urlsafe(6)
        self._cid_counter = itertools.count()
        self._housekeeping_timer: asyncio.TimerHandle | None = None
        # The connections of the housekeeping round under way, and the next to visit.
        self._sweep: list[ServerSentEventConnection] = []
        self._sweep_at = 0
        self._sweep_began = 0.0  # loop time
        # Streams to stop when their credential expires (conn.auth_expires_at).
        self._auth_deadlines = Deadlines(self._auth_expired, self._connections.keys)
        self._shutting_down = False

    @property
    def coalescer(self) -> Coalescer | None:
        """The coalescing window new connections join; ``None`` while
        :attr:`coalesce_window` is 0."""
        return self._coalescer if self._coalescer.window else None

    # ----------------------------------------------------------------- mount

    def route(self, pattern: str) -> tuple[str, EventStreamRoute]:
        """A Tornado route for this endpoint: ``Application([handler.route("/events")])``.

        Named groups of ``pattern`` reach :meth:`channels_for` as ``path_kwargs``.
        """
        return (pattern, EventStreamRoute(self))

    # ----------------------------------------------------------------- hooks

    def authorize(
        self, request: HTTPServerRequest
    ) -> Awaitable[bool | Collection[str] | Grant | None] | bool | Collection[str] | Grant | None:
        """Decide whether this request may open a stream (may be ``async``).

        Return ``None`` or ``True`` to allow with the channels of
        :meth:`channels_for`, a collection of channel names to allow with exactly
        those channels, a :class:`~sse_handler.grant.Grant` to allow the channels
        of :meth:`channels_for` if it covers them all (else 403; the connection
        gets the grant's ``subject``, and is stopped with
        :attr:`auth_expired_farewell` at its ``expires_at``), ``False`` to
        answer 403, or raise
        ``tornado.web.HTTPError(401)`` / ``(403)`` / ``(204)``; 204 tells an
        ``EventSource`` to stop reconnecting. Runs before any byte of the stream.
        """
        return None

    def channels_for(self, request: HTTPServerRequest, path_kwargs: dict[str, str]) -> list[str]:
        """The channels a request asks for, before :meth:`authorize` decides.

        The default: a ``channel`` group of the route pattern
        (``route(r"/events/(?P<channel>[^/]+)")``), else every ``channel`` query
        parameter, else :attr:`default_channel`.
        """
        if "channel" in path_kwargs:
            return [path_kwargs["channel"]]
        asked = [v.decode("utf-8", "replace") for v in request.query_arguments.get("channel", [])]
        return asked or [self.default_channel]

    def response_headers(self, request: HTTPServerRequest) -> dict[str, str]:
        """Extra headers for the stream's response head (e.g. CORS)."""
        return {}

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        """Create the connection object for an accepted request (Qore's getConnectionImpl)."""
        return self.connection_class(self, cid, transport, request, last_event_id)

    def on_connection_registered(self, conn: ServerSentEventConnection) -> Awaitable[None] | None:
        """Called after the connection's own ``registered()`` (may be ``async``)."""
        return None

    def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
        """Called once a connection has ended and left the registry."""

    def replay_events_since(
        self, conn: ServerSentEventConnection, last_event_id: str
    ) -> Awaitable[None] | None:
        """Send what the client missed after ``last_event_id`` (may be ``async``).

        Called before ``registered()`` when the request carried a non-empty
        ``Last-Event-ID`` header or ``last_event_id`` query parameter. Live
        events of the connection's channels that arrive meanwhile are held and
        sent after it, minus those the replay already sent, so the hand-off has
        no gap and no duplicate.

        The default asks the broker for the events of ``conn.channels`` after
        ``last_event_id``. When the broker cannot honour the id (unknown, or
        older than its history) the client gets ``event: reset`` with data
        ``{"reason": "unknown_id" | "history_exceeded"}`` instead, so the
        application can refetch its state; a gap is never silent.
        """
        return self._replay_from_broker(conn, last_event_id)

    async def _replay_from_broker(
        self, conn: ServerSentEventConnection, last_event_id: str
    ) -> None:
        if len(last_event_id) > self.max_last_event_id or "\0" in last_event_id:
            replay = Replay(reset="unknown_id")  # not worth a lookup
        else:
            try:
                replay = await self.router.replay(conn, last_event_id)
            except BrokerUnavailableError as exc:
                # Neither a replay nor a reset can be told: come back later.
                self.broker_outage.failed("a replay", exc)
                conn.stop(None, self.jittered_retry(), reason=CloseReason.BROKER_ERROR)
                return
            self.broker_outage.succeeded()
        if replay.reset is not None:
            self.counters.resets[replay.reset] += 1
            conn.send(event="reset", data={"reason": replay.reset})

    async def subscribe(self, conn: ServerSentEventConnection, channel: str) -> None:
        """Subscribe ``conn`` to ``channel`` (what ``conn.subscribe`` does)."""
        await self.router.subscribe(conn, channel)
        self._cluster.update(conn)

    def unsubscribe(self, conn: ServerSentEventConnection, channel: str) -> None:
        """Unsubscribe ``conn`` from ``channel``."""
        self.router.unsubscribe(conn, channel)
        self._cluster.update(conn)

    # --------------------------------------------------------------- registry

    def connection_ids(self) -> list[str]:
        """The cids of the registered connections."""
        return list(self._connections)

    def connections(self) -> list[ServerSentEventConnection]:
        """The registered connections."""
        return list(self._connections.values())

    def stats(self) -> Snapshot:
        """Counts of this endpoint: open, opened, closed by reason, events,
        bytes, drops, replays, resets by reason, and the live queue depths."""
        return self.counters.snapshot(self._connections.values())

    def __len__(self) -> int:
        return len(self._connections)

    def get_connection(self, cid: str) -> ServerSentEventConnection:
        """The connection with this cid; :class:`UnknownConnectionError` if none."""
        try:
            return self._connections[cid]
        except KeyError:
            raise UnknownConnectionError(cid) from None

    # ------------------------------------------------------------------ admin

    def send_all(
        self, event: ServerSentEvent | None = None, /, **fields: Unpack[EventFields]
    ) -> int:
        """Send one event to every connection; returns how many accepted it.

        The event is encoded once and the same bytes go to every connection.
        """
        return self.send_encoded_all(event_frame(event, fields))

    async def publish(
        self, channel: str, event: ServerSentEvent | None = None, /, **fields: Unpack[EventFields]
    ) -> str:
        """Publish to a channel through the broker; returns the event's id.

        Every process subscribed to the channel (this one included) delivers it
        to its local subscribers, encoded once per process. The broker assigns
        the id unless the event has one. Raises
        :class:`~sse_handler.brokers.BrokerUnavailableError` when the broker
        cannot be reached; then nothing was published.
        """
        event = as_event(event, fields)
        self.write_limits.check_event_size(event.encode())
        return await self.router.broker.publish(channel, event)

    def subscribers(self, channel: str) -> list[ServerSentEventConnection]:
        """The local connections subscribed to ``channel``."""
        return self.router.subscribers(channel)

    def send_encoded_all(
        self, frame: bytes, connections: Iterable[ServerSentEventConnection] | None = None
    ) -> int:
        """Send a pre-encoded frame to every (or the given) connection; returns
        how many accepted it (not those that have ended or dropped it)."""
        self.write_limits.check_event_size(frame)
        frames = framed(frame)
        delivered = 0
        for conn in list(self._connections.values()) if connections is None else connections:
            if conn.writer.deliver(frames):
                delivered += 1
        return delivered

    def send_one(
        self, cid: str, event: ServerSentEvent | None = None, /, **fields: Unpack[EventFields]
    ) -> None:
        """Send one event to the connection ``cid``."""
        self.get_connection(cid).send_encoded(event_frame(event, fields))

    def stop_one(
        self, cid: str, farewell: ServerSentEvent | None = None, retry: int | None = None
    ) -> None:
        """Stop the connection ``cid``, after an optional farewell and retry hint."""
        self.get_connection(cid).stop(farewell, retry)

    def stop_all(self, farewell: ServerSentEvent | None = None, retry: int | None = None) -> None:
        """Stop every connection, each after the optional farewell (encoded once)."""
        for conn in list(self._connections.values()):
            conn.stop(farewell, retry)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Close every connection within ``grace`` seconds.

        New requests get a retry hint and a close. Each open connection gets
        :attr:`shutdown_farewell` and a ``retry:`` hint drawn from
        :attr:`reconnect_retry` (jittered per connection, so that clients spread
        their reconnects), then closes once that is written; whatever has not
        closed when the grace time is up is closed at once.
        """
        self._shutting_down = True
        self._auth_deadlines.cancel()
        if self._housekeeping_timer is not None:
            self._housekeeping_timer.cancel()
            self._housekeeping_timer = None
        self._sweep = []
        conns = list(self._connections.values())
        for conn in conns:
            conn.stop(self.shutdown_farewell, self.jittered_retry(), reason=CloseReason.SHUTDOWN)
        # Each stop wrote its stream's coalesced frames; no timer outlives shutdown.
        self._coalescer.end_window()
        waiting = [c.wait_closed() for c in conns if c.close_reason is None]
        if waiting:
            await asyncio.wait([asyncio.ensure_future(w) for w in waiting], timeout=grace)
        for conn in list(self._connections.values()):
            conn.close(CloseReason.SHUTDOWN)
        await self._cluster.detach(self)

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` has begun."""
        return self._shutting_down

    def jittered_retry(self) -> int:
        """A "come back later" hint in ms, drawn from :attr:`reconnect_retry`."""
        return random.randint(*self.reconnect_retry)

    def over_limit(self, remote_ip: str | None) -> bool:
        """Would one more stream from ``remote_ip`` exceed a cap?"""
        if self.max_connections and self._admitted >= self.max_connections:
            return True
        return bool(
            self.max_connections_per_ip
            and self._per_ip[remote_ip or ""] >= self.max_connections_per_ip
        )

    def reserve(self, remote_ip: str | None) -> bool:
        """Take a slot under the caps for a request about to be authorized;
        False when a cap is reached. Every slot taken is given back once by
        :meth:`release`: by the accept path when it answers without a stream,
        else when the stream's connection ends."""
        if self.over_limit(remote_ip):
            return False
        self._admitted += 1
        self._per_ip[remote_ip or ""] += 1
        return True

    def release(self, remote_ip: str | None) -> None:
        """Give back a slot taken by :meth:`reserve`."""
        ip = remote_ip or ""
        self._admitted -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def check_event_size(self, frame: bytes) -> None:
        """Refuse (``ValueError``) a frame over :attr:`max_event_size`."""
        self.write_limits.check_event_size(frame)

    # -------------------------------------------------------------- lifecycle

    def new_cid(self) -> str:
        """A fresh connection id: short, URL-safe ASCII, unique in this process.

        A random prefix drawn once per handler (so ids from different
        processes or restarts differ) and a counter: no system call per
        connection, unlike drawing random bytes each time.
        """
        return self._cid_prefix + _base62(next(self._cid_counter))

    def open_stream(
        self,
        request: HTTPServerRequest,
        transport: SocketTransport | ClosedTransport,
        channels: Iterable[str],
        head: bytes,
        last_event_id: str | None,
        grant: Grant | None = None,
    ) -> None:
        """Turn an authorized request into a connection (the accept path's one
        entry point). Its slot (:meth:`reserve`) now belongs to the connection,
        and the ``grant`` ``authorize()`` returned gives it its ``subject`` and
        ``auth_expires_at``.

        Registration runs apart from Tornado's connection (awaited inside the
        request, a hook that waits, an async ``registered()``, would keep
        ``HTTPServer.close_all_connections()`` waiting), soon after, in one
        callback with the other streams accepted in the same turn of the
        loop; it goes on in a task of its own from the first time it waits
        (on a broker that needs one, on an async hook). See
        :func:`~sse_handler.tasks.start_soon`.
        """
        try:
            conn = self.get_connection_impl(request, self.new_cid(), transport, last_event_id)
        except Exception:
            log.exception("Uncaught exception in get_connection_impl")
            _refuse(transport, b"500 Internal Server Error")
            self.release(request.remote_ip)
            return
        if grant is not None:
            conn.subject = grant.subject
            conn.auth_expires_at = grant.expires_at
        if isinstance(transport, ClosedTransport):
            conn.close(CloseReason.CLIENT_CLOSED)  # left during authorize()
            return
        start_soon(self._register(conn, list(channels), head), f"registration of {conn.cid}")

    async def _register(
        self, conn: ServerSentEventConnection, channels: list[str], head: bytes
    ) -> None:
        """Channels, head, registry, replay, hooks, then live (docs/architecture.md,
        "Lifecycle of one connection").

        The channels are subscribed before the head is written, so a client that
        sees its stream open is already receiving its channels; their events
        are held by the router until the head (and the replay, if any) has gone out.
        """
        self.router.hold(conn)
        asked = False
        try:
            for channel in channels:
                asked = await self.router.subscribe(conn, channel) or asked
        except BrokerUnavailableError as exc:
            # An outage is logged once (and summed up), not per stream.
            self.broker_outage.failed("subscribing", exc)
            self._turn_away(conn, head, CloseReason.BROKER_ERROR)
            return
        except Exception:
            # A broker's own bug: this connection is turned away, not left
            # holding its socket.
            log.exception("Could not subscribe connection %s", conn.cid)
            self._turn_away(conn, head, CloseReason.BROKER_ERROR)
            return
        if asked:
            self.broker_outage.succeeded()
        if conn.close_reason is not None:
            return  # the client left while the channels were subscribed
        if self._shutting_down:
            # shutdown() began while this request was in authorize() or
            # subscribing: it only knows the registry, so answer here.
            self._turn_away(conn, head, CloseReason.SHUTDOWN)
            return
        # The head waits for what the replay and registered() send at once
        # (see FrameWriter.hold): they leave in one write, unless a hook waits.
        conn.writer.hold(head)
        self._connections[conn.cid] = conn
        if self.max_connection_age:
            conn.expires_at = time.monotonic() + self.max_connection_age * random.uniform(0.9, 1.1)
        if conn.auth_expires_at is not None:
            # A wall-clock expiry (a JWT's exp) as a time of the loop's clock.
            loop = asyncio.get_running_loop()
            self._auth_deadlines.add(loop.time() + conn.auth_expires_at - time.time(), conn.cid)
        self.counters.opened += 1
        self._ensure_housekeeping()
        if conn.last_event_id:
            self.counters.replays += 1
            replay = self.replay_events_since
            # The default replay is the broker's: the router gives it a task if it needs one.
            own = getattr(replay, "__func__", None) is ServerSentEventHandler.replay_events_since
            ran = self._run_hook(conn, replay, conn, conn.last_event_id, own=own)
            if not (ran if ran is True or ran is False else await ran):
                return
            if not conn.is_active:
                return  # turned away (the broker could not replay)
        self.router.release_held(conn)
        for hook, args in ((conn.registered, ()), (self.on_connection_registered, (conn,))):
            ran = self._run_hook(conn, hook, *args)
            if not (ran if ran is True or ran is False else await ran):
                return
        # Written once the turn's other registrations are done (after_batch).
        after_batch(conn.writer.release)
        conn.headers = _kept_headers(conn.headers, self._kept)
        self._cluster.track(conn)
        conn.start_source()

    def _turn_away(
        self, conn: ServerSentEventConnection, head: bytes, reason: CloseReason
    ) -> None:
        """Head, a "come back later" hint, close: a browser retries after the hint."""
        conn.writer.hold(head)
        conn.writer.stop(reason, encode_retry(self.jittered_retry()))

    def _run_hook(
        self, conn: ServerSentEventConnection, hook: Any, *args: Any, own: bool = False
    ) -> bool | Awaitable[bool]:
        """Run one hook; one that raises closes only this connection. Whether
        the connection goes on: at once for a plain hook (no coroutine to
        make and await), awaitable for an async one.

        An application's async hook runs in a task (registration starts
        without one, see :func:`~sse_handler.tasks.start_soon`): it may use
        ``asyncio.timeout`` or anything else that needs a current task.
        """
        if conn.close_reason is not None:
            return False
        try:
            result = hook(*args)
        except ConnectionClosedError:
            return False  # the connection ended under the hook: not the hook's fault
        except Exception:
            self._hook_failed(conn, hook)
            return False
        if result is not None and inspect.isawaitable(result):
            return self._await_hook(conn, hook, result, own)
        return conn.close_reason is None

    async def _await_hook(
        self, conn: ServerSentEventConnection, hook: Any, result: Awaitable[Any], own: bool
    ) -> bool:
        try:
            if not own:
                await in_task()
            # An async hook may wait on anything: the client sees the stream
            # open as soon as it waits, not when it is done. One that does
            # not wait (a replay from memory) adds to the held write: head,
            # replay and welcome leave in one send.
            await until_done(result, conn.writer.release)
        except ConnectionClosedError:
            return False
        except Exception:
            self._hook_failed(conn, hook)
            return False
        return conn.close_reason is None

    def _hook_failed(self, conn: ServerSentEventConnection, hook: Any) -> None:
        log.exception("Uncaught exception in %s for connection %s", hook.__name__, conn.cid)
        conn.close(CloseReason.HOOK_ERROR)

    def connection_ended(self, conn: ServerSentEventConnection) -> None:
        """Called by a connection once it has closed: it leaves the registry,
        its channels and its slot, then :meth:`on_connection_deregistered` runs."""
        if self._connections.get(conn.cid) is conn:
            del self._connections[conn.cid]
        self.release(conn.remote_ip)
        self.counters.connection_closed(conn, conn.close_reason or "unknown")
        self._cluster.untrack(conn)
        self.router.forget(conn)
        try:
            self.on_connection_deregistered(conn)
        except Exception:
            log.exception("Uncaught exception in on_connection_deregistered for %s", conn.cid)

    def _auth_expired(self, cid: str) -> None:
        """A stream's credential has expired: farewell, retry hint, close."""
        conn = self._connections.get(cid)
        if conn is None or not conn.is_active:
            return
        conn.stop(
            self.auth_expired_farewell, self.jittered_retry(), reason=CloseReason.AUTH_EXPIRED
        )

    def _ensure_housekeeping(self, at: float | None = None) -> None:
        """One timer per handler, not per connection: keep-alives and ages.
        Its next callback runs at loop time ``at`` (default: a period from now)."""
        if self._housekeeping_timer is not None or self._shutting_down:
            return
        period = self._housekeeping_period()
        if period:
            loop = asyncio.get_running_loop()
            when = loop.time() + period if at is None else at
            self._housekeeping_timer = loop.call_at(when, self._housekeeping_tick)

    def _housekeeping_period(self) -> float:
        # Half the keep-alive interval: a quiet connection gets its comment
        # between 1 and 1.5 intervals after its last write.
        periods = []
        if self.keepalive:
            periods.append(self.keepalive / 2)
        if self.max_connection_age:
            periods.append(max(0.01, self.max_connection_age / 20))
        return min(periods, default=0.0)

    def _housekeeping_tick(self) -> None:
        """One slice of a sweep: the next :attr:`_sweep_slice` connections of the round.

        A round visits, once each, the connections registered when it began:
        in one callback when they fit in a slice, else in slices spread evenly
        over the period, at fixed times from the round's start (the slices' own
        time does not stretch the round); the next round begins one period
        after this one did. Every connection is visited once per period either
        way, and no callback holds the loop for more than a slice: one callback
        walking the 19,000 streams of a process held it for 170 ms here, and
        the p99 of the clients receiving events grew 7-fold (bench/notes.md,
        issue 15). In a steady fleet a connection keeps its place in the round;
        when others come and go it moves, and its visit may come up to a period
        early or late (its comment after 0.5 to 2 intervals of silence instead
        of 1 to 1.5).
        """
        self._housekeeping_timer = None
        period = self._housekeeping_period()
        if self._sweep_at >= len(self._sweep):  # a new round
            self._sweep = list(self._connections.values())
            self._sweep_at = 0
            self._sweep_began = asyncio.get_running_loop().time()
            if not self._sweep or not period:
                return  # restarted by the next registration
        at = self._sweep_at
        self._sweep_at = at + self._sweep_slice
        now = time.monotonic()
        # Quiet for `quiet_ticks` ticks means quiet for at least the interval
        # (a write just after a tick leaves one tick less of silence).
        quiet_ticks = math.ceil(self.keepalive / period) + 1 if self.keepalive else 0
        for conn in self._sweep[at : self._sweep_at]:
            if not conn.is_active:
                continue
            if conn.expires_at is not None and conn.expires_at <= now:
                conn.stop(None, self.jittered_retry(), reason=CloseReason.MAX_AGE)
            elif quiet_ticks:
                conn.writer.keepalive(_KEEPALIVE, quiet_ticks)
        slices = math.ceil(len(self._sweep) / self._sweep_slice)
        done = math.ceil(self._sweep_at / self._sweep_slice)  # slices, this one included
        if self._sweep_at >= len(self._sweep):
            self._sweep = []  # the round is over: no reference to closed connections
        self._ensure_housekeeping(self._sweep_began + period * done / slices)


def _checked_window(window: float) -> float:
    """``coalesce_window``, refused where it is set rather than at the first event."""
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise TypeError(f"coalesce_window must be a number of seconds, not {window!r}")
    if not math.isfinite(window) or window < 0:
        raise ValueError(f"coalesce_window must be finite and >= 0 (seconds), not {window!r}")
    return float(window)


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n: int) -> str:
    out = _BASE62[n % 62]
    n //= 62
    while n:
        out = _BASE62[n % 62] + out
        n //= 62
    return out


def _kept_headers(headers: HTTPHeaders, kept: frozenset[str]) -> HTTPHeaders:
    """A copy of the headers named in ``kept`` (lower-case names)."""
    copy = HTTPHeaders()
    for name in headers:  # each name once, in the request's order
        if name.lower() in kept:
            first, *more = headers.get_list(name)
            # Checked when the request was parsed: add() would check again.
            copy[name] = first
            for value in more:
                copy.add(name, value)  # a repeated header keeps every value
    return copy


def _refuse(transport: SocketTransport | ClosedTransport, status: bytes) -> None:
    """An error answer after Tornado has let go of the stream."""
    try:
        transport.send(
            b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    except OSError:
        pass
    transport.close()
