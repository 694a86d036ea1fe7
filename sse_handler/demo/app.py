"""The demo application: a page, its event stream, a publish endpoint, and the admin API.

Routes:

``GET /``
    ``page.html``: an ``EventSource`` on ``/page/events`` that lists every
    event of the channels the visitor picks (name, id, channel, data), and a
    form that publishes.
``GET /events[?channel=NAME...][&subject=NAME]``
    The stream. Each connection first gets ``event: welcome`` with
    ``{"connection_id": "<cid>"}``, then every event published to its
    channels (default ``default``); ``Last-Event-ID`` resumes. ``subject``
    names the connection's user for the admin API and presence -- a demo
    convenience, used only when no authentication set ``conn.subject``
    (:attr:`DemoHandler.subject_from_query`): a real application takes the
    subject from what it authenticated, never from the query.
``GET /page/events[?channel=NAME...]``
    The page's stream: the same, but each channel event comes as an unnamed
    ``message`` whose data is a JSON envelope with its channel, name, id and
    data, so that the page sees events of any name (see
    :mod:`sse_handler.demo.page_stream`).
``POST /publish[?channel=NAME][&event=NAME][&id=ID]``
    The body (UTF-8 text) is the data of one event published to the channel
    (default ``default``); answers ``{"delivered_to": N, "id": "<id>"}``, N
    being this process's subscribers, and ``503`` when the broker is down. A
    field the event model refuses (an ``event`` with a line break, an ``id``
    with NUL, ...) answers ``400`` with ``{"error": "<message naming the
    field>"}`` and nothing is sent.
    ``curl --data-binary @file`` keeps line breaks; ``curl -d`` strips them.
``POST /tickets[?channel=NAME...]`` (with ``--jwt-secret``)
    For a valid JWT (as ``/events`` takes it): ``{"ticket": "...",
    "expires_in": 30}``, a single-use ticket for ``/events?ticket=...`` or
    ``/page/events?ticket=...`` with the channels asked for (each covered by
    the token's ``channels`` claim, else 403) or, if none, the token's
    patterns; the stream ends when the token does.
``GET /metrics``
    Prometheus metrics of ``/events`` and of the control plane, when
    ``sse_handler[metrics]`` is installed.
With ``--jwt-secret`` both streams (and ``/tickets``) require a JWT (HS256,
with ``sub``, ``exp`` and a ``channels`` claim of patterns, ``*`` matching
any run of characters) as ``Authorization: Bearer``, the cookie
``sse_token`` or ``?token=``, or a ticket; 401 without a valid one, 403 for a
channel its patterns do not cover, and ``event: auth_expired`` then a close
when the token expires. ``/publish`` then requires a token whose
``publish`` claim covers the channel (401, 403).
``/admin/connections[/<cid>]``, ``/admin/presence/<channel>``, ``/admin/subjects/<subject>``
    :mod:`sse_handler.admin`, mounted only when an admin token is given; it
    lists and stops the connections of both streams of every demo process on
    the same Redis, and shows presence.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable
from functools import cache
from typing import Any, Unpack

import tornado.web
from tornado.httputil import HTTPServerRequest
from tornado.log import access_log
from tornado.netutil import bind_sockets

from ..admin import admin_routes
from ..auth import JWTVerifier, StreamAuth, tickets_for
from ..brokers import Broker, BrokerUnavailableError
from ..brokers.memory import MemoryBroker
from ..cluster import ControlPlane, control_plane_for, subject_of
from ..connection import ServerSentEventConnection
from ..errors import UnknownConnectionError
from ..event import ServerSentEvent
from ..grant import Grant
from ..handler import HandlerSettings, ServerSentEventHandler
from ..server import make_server
from ..writer import Transport
from .page_stream import SharedBroker, envelope

__all__ = [
    "MAX_PUBLISH_BYTES",
    "DemoConnection",
    "DemoConnections",
    "DemoHandler",
    "PageStreamHandler",
    "TicketsHandler",
    "make_app",
    "serve",
]

log = logging.getLogger("sse_handler.demo")

#: Larger publish bodies get 413: every client would receive a copy.
MAX_PUBLISH_BYTES = 64 * 1024


class DemoConnection(ServerSentEventConnection):
    """Greets each client with its connection id."""

    def registered(self) -> None:
        self.send(event="welcome", data={"connection_id": self.cid})


class _QuerySubject(ServerSentEventHandler):
    """Takes a connection's subject from ``?subject=`` when nothing else set one."""

    #: Demo only: read ``?subject=`` when no authentication set ``conn.subject``.
    #: Whoever adds authentication to the demo turns this off with it.
    subject_from_query: bool = True

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        conn = super().get_connection_impl(request, cid, transport, last_event_id)
        asked = request.query_arguments.get("subject")
        if self.subject_from_query and asked and subject_of(conn) is None:
            # setattr: the attribute is declared once authentication (issue 13) lands.
            setattr(conn, "subject", asked[-1].decode("utf-8", "replace"))  # noqa: B010
        return conn


class AuthenticatedStream(_QuerySubject):
    """A stream that, given a :class:`~sse_handler.auth.StreamAuth` (``auth``),
    opens only for a ticket or token that covers its channels."""

    #: Set by :func:`make_app` with ``jwt_secret``; ``None``: no authentication.
    auth: StreamAuth | None = None

    def authorize(self, request: HTTPServerRequest) -> Awaitable[Grant] | None:
        if self.auth is None:
            return None
        return self.auth.authorize(request, self.cors)


class PageStreamHandler(AuthenticatedStream):
    """``/page/events``: connections that say welcome, over an enveloping broker view."""

    connection_class = DemoConnection


class DemoHandler(AuthenticatedStream):
    """The demo's endpoint ``/events``: a plain handler whose connections say welcome.

    Its :attr:`page_stream` serves the page's stream over the same broker
    (``broker``, default a :class:`~sse_handler.brokers.memory.MemoryBroker`)
    and the same control plane (``cluster``, default the broker's);
    :meth:`shutdown` closes both.
    """

    connection_class = DemoConnection

    def __init__(self, **settings: Unpack[HandlerSettings]) -> None:
        shared = SharedBroker(settings.get("broker") or MemoryBroker())
        settings["broker"] = shared.view()
        cluster: ControlPlane = settings.get("cluster") or control_plane_for(shared.broker)
        settings["cluster"] = cluster
        super().__init__(**settings)
        #: The broker under both streams.
        self.shared_broker = shared
        #: ``/page/events``: the same channels and ids, every channel event in an envelope.
        self.page_stream = PageStreamHandler(broker=shared.view(envelope), cluster=cluster)

    async def shutdown(self, grace: float = 5.0) -> None:
        await asyncio.gather(super().shutdown(grace), self.page_stream.shutdown(grace))


class DemoConnections:
    """The connections of both streams, for the admin API (an ``AdminTarget``)."""

    def __init__(self, *handlers: ServerSentEventHandler) -> None:
        self.handlers = handlers
        #: The plane the handlers share: the admin API goes through it.
        self.cluster = handlers[0].cluster if handlers else None

    def connections(self) -> list[ServerSentEventConnection]:
        return [conn for handler in self.handlers for conn in handler.connections()]

    def get_connection(self, cid: str) -> ServerSentEventConnection:
        for handler in self.handlers:
            try:
                return handler.get_connection(cid)
            except UnknownConnectionError:
                continue
        raise UnknownConnectionError(cid)


@cache
def page() -> bytes:
    """The demo page, read once from the package data."""
    return importlib.resources.files("sse_handler.demo").joinpath("page.html").read_bytes()


class PageHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        # The page must work offline: the policy forbids loading anything else.
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'",
        )
        self.write(page())


class _JSONHandler(tornado.web.RequestHandler):
    def initialize(self, sse_handler: DemoHandler) -> None:
        self.sse_handler = sse_handler

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(body)

    async def _grant(self) -> Grant | None:
        """The request's token as a grant, or ``None`` once a 401/403/503 is answered."""
        auth = self.sse_handler.auth
        assert auth is not None
        try:
            return await auth.authenticate(self.request, self.sse_handler.cors)
        except tornado.web.HTTPError as exc:
            self._answer(exc.status_code, {"error": exc.reason or "not allowed"})
            return None


class TicketsHandler(_JSONHandler):
    """``POST /tickets``: a single-use ticket for the holder of a valid token."""

    async def post(self) -> None:
        auth = self.sse_handler.auth
        assert auth is not None
        grant = await self._grant()
        if grant is None:
            return
        asked = [
            v.decode("utf-8", "replace") for v in self.request.query_arguments.get("channel", [])
        ]
        if not all(grant.may_read(channel) for channel in asked):
            self._answer(403, {"error": "a channel the token does not cover"})
            return
        try:
            ticket = await auth.issue_ticket(
                grant.subject, asked or grant.read.patterns, expires_at=grant.expires_at
            )
        except BrokerUnavailableError as exc:
            self._answer(503, {"error": str(exc)})
            return
        self.set_header("Cache-Control", "no-store")
        self._answer(200, {"ticket": ticket, "expires_in": auth.ticket_ttl})


class PublishHandler(_JSONHandler):
    """``POST /publish``: the body becomes one event for every connection."""

    async def post(self) -> None:
        grant = None
        if self.sse_handler.auth is not None:
            grant = await self._grant()
            if grant is None:
                return
        if len(self.request.body) > MAX_PUBLISH_BYTES:
            self._answer(413, {"error": f"data must be at most {MAX_PUBLISH_BYTES} bytes"})
            return
        try:
            data = self.request.body.decode("utf-8")
            event = ServerSentEvent(
                data=data, event=self._query_field("event"), id=self._query_field("id")
            )
            channel = self._query_field("channel") or self.sse_handler.default_channel
        except UnicodeDecodeError:
            self._answer(400, {"error": "data (the request body) must be valid UTF-8"})
            return
        except ValueError as exc:
            self._answer(400, {"error": str(exc)})
            return
        if grant is not None and not grant.may_publish(channel):
            self._answer(403, {"error": "the token may not publish to this channel"})
            return
        handler = self.sse_handler
        try:
            event_id = await handler.publish(channel, event)
        except BrokerUnavailableError as exc:
            self._answer(503, {"error": str(exc)})
            return
        # With Redis the other processes deliver too; this counts this
        # process's readers of the channel, on /events and on the page's stream.
        delivered = handler.router.count(channel) + handler.page_stream.router.count(channel)
        self._answer(200, {"delivered_to": delivered, "id": event_id})

    def _query_field(self, name: str) -> str | None:
        # Read raw: get_query_argument() would replace control characters
        # (NUL among them) with spaces, hiding exactly what the model must refuse.
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name} must be valid UTF-8") from None


def make_app(
    admin_token: str | None = None,
    broker: Broker | None = None,
    jwt_secret: str | None = None,
    cluster: ControlPlane | None = None,
) -> tuple[tornado.web.Application, DemoHandler]:
    """The demo application and its handler; the admin API only with a token.

    ``broker`` defaults to an in-memory one; pass a RedisBroker to fan out
    across processes (and share tickets). With ``jwt_secret`` (HS256) the
    streams and ``/publish`` require a token, and ``/tickets`` issues tickets.
    ``cluster`` defaults to the broker's control plane.
    """
    handler = DemoHandler(broker=broker, cluster=cluster)
    routes: list[Any] = [
        (r"/", PageHandler),
        handler.route(r"/events"),
        handler.page_stream.route(r"/page/events"),
        (r"/publish", PublishHandler, {"sse_handler": handler}),
    ]
    if jwt_secret is not None:
        auth = StreamAuth(
            # A short secret is the demo user's choice; the CLI warned.
            jwt=JWTVerifier(key=jwt_secret, weak_key=True),
            tickets=tickets_for(broker),
            cookie="sse_token",
            query="token",
        )
        handler.auth = handler.page_stream.auth = auth
        # The subject is the token's sub, never a query parameter.
        handler.subject_from_query = handler.page_stream.subject_from_query = False
        routes.append((r"/tickets", TicketsHandler, {"sse_handler": handler}))
    if admin_token is not None:
        routes += admin_routes(DemoConnections(handler, handler.page_stream), admin_token)
    routes += _metrics_routes(handler)
    return tornado.web.Application(routes, log_function=_log_request), handler


def _metrics_routes(handler: DemoHandler) -> list[Any]:
    """``/metrics`` when the ``metrics`` extra (prometheus-client) is installed."""
    try:
        from prometheus_client import CollectorRegistry

        from ..metrics import metrics_route, register_cluster_metrics, register_metrics
    except ImportError:
        return []
    registry = CollectorRegistry()  # one per app: tests build several
    register_metrics(handler, "events", registry)
    register_cluster_metrics(handler.cluster, registry)
    return [metrics_route("/metrics", registry)]


def _log_request(rh: tornado.web.RequestHandler) -> None:
    """Tornado's access log, one level quieter: successes at DEBUG, client errors at INFO."""
    status = rh.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        ms = 1000.0 * rh.request.request_time()
        access_log.log(level, "%d %s %.2fms", status, rh._request_summary(), ms)


async def serve(
    host: str,
    port: int,
    admin_token: str | None = None,
    redis_url: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    redis_cluster: bool = False,
    jwt_secret: str | None = None,
    presence_ttl: float | None = None,
    coalesce_window: float = 0.0,
    history_size: int = 1000,
) -> None:
    """Serve the demo until SIGINT or SIGTERM, then close the streams (grace 2 s).

    ``port`` 0 picks a free port; the URL logged names the real one. With
    ``redis_url`` the channels go through Redis Streams, so several demo
    processes share events and history. With ``ssl_context`` (a server
    context holding a certificate) every route is served over HTTPS. With
    ``redis_cluster`` the URL names a node of a Redis Cluster, and channels are
    grouped by their name up to the first ``:`` (``room7:chat`` and
    ``room7:news`` share a shard and an exact order). With ``jwt_secret``
    the streams and ``/publish`` require a JWT (see the module). ``presence_ttl``
    (seconds, with Redis) bounds how long a crashed process stays in
    presence (:class:`~sse_handler.brokers.redis_control.RedisControlPlane`).
    ``coalesce_window`` (seconds) is both stream handlers' ``coalesce_window``.
    ``history_size`` is the broker's: events kept per channel for replay.
    """
    broker: Broker | None = None
    cluster: ControlPlane | None = None
    if redis_url is not None:
        from ..brokers.redis import RedisBroker, by_prefix
        from ..brokers.redis_control import RedisControlPlane

        if redis_cluster:
            broker = RedisBroker(
                redis_url, cluster=True, shard_by=by_prefix(":"), history_size=history_size
            )
        else:
            broker = RedisBroker(redis_url, history_size=history_size)
        if presence_ttl is not None:
            cluster = RedisControlPlane.for_broker(broker, presence_ttl=presence_ttl)
    else:
        broker = MemoryBroker(history_size=history_size)
    app, handler = make_app(admin_token, broker, jwt_secret=jwt_secret, cluster=cluster)
    handler.coalesce_window = handler.page_stream.coalesce_window = coalesce_window
    # Reachable by other processes' admin requests before the first stream.
    if handler.cluster is not None:
        await handler.cluster.start()
    # Long-lived servers: move what start-up made out of the collector's
    # reach, and collect less often; measured on the 9,000-connection accept
    # (bench/notes.md), about 10 % less CPU per accepted stream.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    # A backlog that takes a reconnect storm: with the default 128, SYNs
    # overflow and clients come back seconds after their retry hint.
    sockets = bind_sockets(port, host, backlog=4096)
    server = make_server(app, ssl_options=ssl_context)
    server.add_sockets(sockets)
    scheme = "http" if ssl_context is None else "https"
    log.info("sse_handler demo: open %s in a browser", _url(scheme, sockets[0]))
    try:
        await _wait_for_signal(signal.SIGINT, signal.SIGTERM)
    finally:
        server.stop()
        await handler.shutdown(grace=2)
        await server.close_all_connections()
        if handler.auth is not None and handler.auth.tickets is not None:
            await handler.auth.tickets.close()
        if broker is not None:
            await broker.close()


def _url(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


async def _wait_for_signal(*signals: signal.Signals) -> None:
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for sig in signals:
        try:
            loop.add_signal_handler(sig, received.set)
        except NotImplementedError:  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(received.set))
    try:
        await received.wait()
    finally:
        for sig in signals:
            try:
                loop.remove_signal_handler(sig)
            except NotImplementedError:
                signal.signal(sig, signal.SIG_DFL)
    log.info("sse_handler demo: stopping")
