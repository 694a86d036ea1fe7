"""A small admin HTTP API over the connections of a :class:`ServerSentEventHandler`.

It is off unless a token is configured: nothing mounts these routes by itself,
and :func:`admin_routes` refuses to build them without a non-empty token (the
demo mounts them only when started with ``--admin-token``). Every request must
carry ``Authorization: Bearer <token>``; a missing or wrong token gets ``401``
with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3). The token is
compared in constant time, as bytes, so its length and content do not leak
through timing.

Routes, under ``prefix`` (default ``/admin``), over the whole deployment: they
go through a :class:`~sse_handler.cluster.ControlPlane` (``cluster``, by
default ``handler.cluster``), so behind several processes on Redis they see
and reach the connections of every process (see :mod:`sse_handler.cluster`):

``GET {prefix}/connections``
    ``200`` and a JSON list with one dict per connection of every process
    that answered in time: the :meth:`ServerSentEventConnection.stats` fields
    (cid, path, remote_ip, connected_at, channels, queue_depth, events_sent,
    ...) plus ``process`` (which process holds it) and ``subject`` (its
    authenticated user, or ``null``).

``GET {prefix}/connections/<cid>``
    ``200`` and that connection's dict, wherever it lives.

``DELETE {prefix}/connections/<cid>``
    Stops that connection, wherever it lives, after a farewell ``event:
    close`` (so a page can call ``EventSource.close()`` instead of
    reconnecting: ``close`` means "stop for good", and carries no ``retry:``
    hint); ``204``, or ``404`` when no process has it.

``GET {prefix}/presence/<channel>``
    ``200`` and ``{"channel": ..., "connections": [{"cid", "subject",
    "process", "since"}, ...], "subjects": [{"subject", "connections",
    "processes", "since"}, ...]}``: who reads the channel now, and the same
    per subject.

``DELETE {prefix}/subjects/<subject>``
    Stops every connection of that subject on every process, each after
    ``event: close``; ``200`` and ``{"stopped": N}`` (``N`` may be 0).

Path segments are percent-decoded (``/admin/presence/room%2F7`` is channel
``room/7``). When the broker cannot be reached, an answer is ``503``.

Every other answer is JSON too, ``{"error": "<message>"}`` with
``Content-Type: application/json``: an unknown cid and any other path under
``prefix`` get ``404``, a method a route does not have gets ``405`` with an
``Allow`` header, a missing or wrong token ``401``, and an error Tornado raises
(a ``400`` for a malformed request, a ``500``) keeps its status. A method is
checked before the token, as Tornado does for every handler.

``handler`` is anything with the :class:`AdminTarget` methods: a
:class:`~sse_handler.handler.ServerSentEventHandler`, or an object that joins
several (the demo's page and ``/events`` streams are two handlers). Without a
``cluster`` argument nor a ``cluster`` attribute on ``handler``, the API
serves ``handler``'s connections alone, through a plane of its own.

::

    app = Application([handler.route(r"/events"), *admin_routes(handler, token)])
"""

from __future__ import annotations

import hmac
import json
from dataclasses import asdict
from http import HTTPStatus
from typing import Any, Protocol

from tornado.web import HTTPError, RequestHandler

from .brokers import BrokerUnavailableError
from .cluster import ControlPlane, roll_up
from .connection import ServerSentEventConnection
from .event import ServerSentEvent

__all__ = ["CLOSE_FAREWELL", "AdminTarget", "admin_routes"]

#: What a stopped client receives last: a named event a page can listen for.
CLOSE_FAREWELL = ServerSentEvent(event="close", data="")

_REALM = 'Bearer realm="sse_handler admin"'

Route = tuple[str, type[RequestHandler], dict[str, Any]]


class AdminTarget(Protocol):
    """What the admin API needs of the connections it serves."""

    def connections(self) -> list[ServerSentEventConnection]: ...

    def get_connection(self, cid: str) -> ServerSentEventConnection:
        """The connection ``cid``; raises :class:`~sse_handler.errors.UnknownConnectionError`."""
        ...


def admin_routes(
    handler: AdminTarget,
    token: str,
    prefix: str = "/admin",
    *,
    cluster: ControlPlane | None = None,
) -> list[Route]:
    """The admin API's Tornado routes for ``handler``, guarded by ``token``.

    ``cluster`` is the plane the routes go through (default:
    ``handler.cluster``).

    ``prefix`` must start with ``/`` and not end with one. Raises
    ``ValueError`` for an empty token: an empty secret would open the API to
    anyone who sends ``Authorization: Bearer``.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("token must be a non-empty str")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must start with '/' and not end with one, not {prefix!r}")
    plane = cluster or getattr(handler, "cluster", None)
    if plane is None:
        plane = ControlPlane()
        plane.attach(handler)
    kwargs: dict[str, Any] = {"cluster": plane, "token": token.encode("utf-8")}
    return [
        (prefix + r"/connections", ConnectionsHandler, kwargs),
        (prefix + r"/connections/([^/]+)", ConnectionHandler, kwargs),
        (prefix + r"/presence/([^/]+)", PresenceHandler, kwargs),
        (prefix + r"/subjects/([^/]+)", SubjectHandler, kwargs),
        (prefix + r"(?:/.*)?", NotFoundHandler, kwargs),
    ]


class _AdminRequestHandler(RequestHandler):
    """Checks the bearer token before any method runs; answers JSON."""

    def initialize(self, cluster: ControlPlane, token: bytes) -> None:
        self.cluster = cluster
        self._token = token

    def prepare(self) -> None:
        self.set_header("Cache-Control", "no-store")
        given = self._bearer_token()
        if given is None:
            self._deny(_REALM, "missing bearer token")
        elif not hmac.compare_digest(given, self._token):
            self._deny(_REALM + ', error="invalid_token"', "invalid bearer token")

    def _bearer_token(self) -> bytes | None:
        scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # RFC 9110 11.1: any case
            return None
        # Tornado decodes header values as Latin-1; that undoes it, giving the
        # bytes the client sent, so a non-ASCII (UTF-8) token compares equal.
        return credentials.strip().encode("latin-1")

    def _deny(self, challenge: str, message: str) -> None:
        self.set_header("WWW-Authenticate", challenge)
        self.write_json(401, {"error": message})

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors Tornado raises (405, 400, 500) as JSON, like the API's own answers."""
        self.set_header("Cache-Control", "no-store")
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.SUPPORTED_METHODS))
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            message = HTTPStatus(status_code).phrase.lower()
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}, separators=(",", ":")))

    def write_unavailable(self, exc: BrokerUnavailableError) -> None:
        self.write_json(503, {"error": str(exc)})


class ConnectionsHandler(_AdminRequestHandler):
    """``GET {prefix}/connections``: every connection of every process."""

    SUPPORTED_METHODS = ("GET",)

    async def get(self) -> None:
        try:
            found = await self.cluster.connections()
        except BrokerUnavailableError as exc:
            self.write_unavailable(exc)
            return
        self.write_json(200, [asdict(conn) for conn in found])


class ConnectionHandler(_AdminRequestHandler):
    """``{prefix}/connections/<cid>``: one connection (``GET``), or stop it
    after ``event: close`` (``DELETE``), wherever it lives."""

    SUPPORTED_METHODS = ("GET", "DELETE")

    async def get(self, cid: str) -> None:
        try:
            conn = await self.cluster.connection(cid)
        except BrokerUnavailableError as exc:
            self.write_unavailable(exc)
            return
        if conn is None:
            self._unknown(cid)
        else:
            self.write_json(200, asdict(conn))

    async def delete(self, cid: str) -> None:
        try:
            found = await self.cluster.stop_one(cid, CLOSE_FAREWELL)
        except BrokerUnavailableError as exc:
            self.write_unavailable(exc)
            return
        if not found:
            self._unknown(cid)
        else:
            self.set_status(204)
            self.finish()

    def _unknown(self, cid: str) -> None:
        self.write_json(404, {"error": f"no connection with cid {cid!r} in any process"})


class PresenceHandler(_AdminRequestHandler):
    """``GET {prefix}/presence/<channel>``: who reads the channel now."""

    SUPPORTED_METHODS = ("GET",)

    async def get(self, channel: str) -> None:
        try:
            entries = await self.cluster.presence(channel)
        except BrokerUnavailableError as exc:
            self.write_unavailable(exc)
            return
        body = {
            "channel": channel,
            "connections": [asdict(entry) for entry in entries],
            "subjects": [asdict(subject) for subject in roll_up(entries)],
        }
        self.write_json(200, body)


class SubjectHandler(_AdminRequestHandler):
    """``DELETE {prefix}/subjects/<subject>``: stop every connection of a subject."""

    SUPPORTED_METHODS = ("DELETE",)

    async def delete(self, subject: str) -> None:
        try:
            stopped = await self.cluster.stop_subject(subject, CLOSE_FAREWELL)
        except BrokerUnavailableError as exc:
            self.write_unavailable(exc)
            return
        self.write_json(200, {"stopped": stopped})


class NotFoundHandler(_AdminRequestHandler):
    """Any other path under the prefix: ``404`` in JSON, once the token is checked."""

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.write_json(404, {"error": f"no admin route {self.request.path}"})
