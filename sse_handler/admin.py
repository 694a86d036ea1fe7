"""A small admin HTTP API over the connections of a :class:`ServerSentEventHandler`.

It is off unless a token is configured: nothing mounts these routes by itself,
and :func:`admin_routes` refuses to build them without a non-empty token (the
demo mounts them only when started with ``--admin-token``). Every request must
carry ``Authorization: Bearer <token>``; a missing or wrong token gets ``401``
with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3). The token is
compared in constant time, as bytes, so its length and content do not leak
through timing.

Routes, under ``prefix`` (default ``/admin``):

``GET {prefix}/connections``
    ``200`` and a JSON list with one :meth:`ServerSentEventConnection.stats`
    dict per registered connection (cid, path, remote_ip, connected_at,
    queue_depth, events_sent, ...).

``GET {prefix}/connections/<cid>``
    ``200`` and that connection's stats dict.

``DELETE {prefix}/connections/<cid>``
    Stops that connection after a farewell ``event: close`` (so a page can
    call ``EventSource.close()`` instead of reconnecting: ``close`` means
    "stop for good", and carries no ``retry:`` hint); ``204``.

Every other answer is JSON too, ``{"error": "<message>"}`` with
``Content-Type: application/json``: an unknown cid and any other path under
``prefix`` get ``404``, a method a route does not have gets ``405`` with an
``Allow`` header, a missing or wrong token ``401``, and an error Tornado raises
(a ``400`` for a malformed request, a ``500``) keeps its status. A method is
checked before the token, as Tornado does for every handler.

``handler`` is anything with the :class:`AdminTarget` methods: a
:class:`~sse_handler.handler.ServerSentEventHandler`, or an object that joins
several (the demo's page and ``/events`` streams are two handlers).

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

from .connection import ServerSentEventConnection
from .errors import UnknownConnectionError
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


def admin_routes(handler: AdminTarget, token: str, prefix: str = "/admin") -> list[Route]:
    """The admin API's Tornado routes for ``handler``, guarded by ``token``.

    ``prefix`` must start with ``/`` and not end with one. Raises
    ``ValueError`` for an empty token: an empty secret would open the API to
    anyone who sends ``Authorization: Bearer``.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("token must be a non-empty str")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must start with '/' and not end with one, not {prefix!r}")
    kwargs: dict[str, Any] = {"sse_handler": handler, "token": token.encode("utf-8")}
    return [
        (prefix + r"/connections", ConnectionsHandler, kwargs),
        (prefix + r"/connections/([^/]+)", ConnectionHandler, kwargs),
        (prefix + r"(?:/.*)?", NotFoundHandler, kwargs),
    ]


class _AdminRequestHandler(RequestHandler):
    """Checks the bearer token before any method runs; answers JSON."""

    def initialize(self, sse_handler: AdminTarget, token: bytes) -> None:
        self.sse_handler = sse_handler
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

    def _connection(self, cid: str) -> ServerSentEventConnection | None:
        """The connection ``cid``, or ``None`` after answering 404."""
        try:
            return self.sse_handler.get_connection(cid)
        except UnknownConnectionError as exc:
            self.write_json(404, {"error": str(exc)})
            return None


class ConnectionsHandler(_AdminRequestHandler):
    """``GET {prefix}/connections``: the stats of every registered connection."""

    SUPPORTED_METHODS = ("GET",)

    def get(self) -> None:
        self.write_json(200, [asdict(conn.stats()) for conn in self.sse_handler.connections()])


class ConnectionHandler(_AdminRequestHandler):
    """``{prefix}/connections/<cid>``: one connection's stats (``GET``), or
    stop it after ``event: close`` (``DELETE``)."""

    SUPPORTED_METHODS = ("GET", "DELETE")

    def get(self, cid: str) -> None:
        if (conn := self._connection(cid)) is not None:
            self.write_json(200, asdict(conn.stats()))

    def delete(self, cid: str) -> None:
        if (conn := self._connection(cid)) is not None:
            conn.stop(CLOSE_FAREWELL)
            self.set_status(204)
            self.finish()


class NotFoundHandler(_AdminRequestHandler):
    """Any other path under the prefix: ``404`` in JSON, once the token is checked."""

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.write_json(404, {"error": f"no admin route {self.request.path}"})
