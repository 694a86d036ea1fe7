"""A small admin HTTP API over one :class:`ServerSentEventHandler`.

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

``DELETE {prefix}/connections/<cid>``
    Stops that connection after a farewell ``event: close`` (so a page can
    call ``EventSource.close()`` instead of reconnecting); ``204``. An unknown
    cid gets ``404`` and a JSON ``{"error": ...}``.

::

    app = Application([handler.route(r"/events"), *admin_routes(handler, token)])
"""

from __future__ import annotations

import hmac
import json
from dataclasses import asdict
from typing import Any

from tornado.web import RequestHandler

from .errors import UnknownConnectionError
from .event import ServerSentEvent
from .handler import ServerSentEventHandler

__all__ = ["CLOSE_FAREWELL", "admin_routes"]

#: What a stopped client receives last: a named event a page can listen for.
CLOSE_FAREWELL = ServerSentEvent(event="close", data="")

_REALM = 'Bearer realm="sse_handler admin"'

Route = tuple[str, type[RequestHandler], dict[str, Any]]


def admin_routes(
    handler: ServerSentEventHandler, token: str, prefix: str = "/admin"
) -> list[Route]:
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
    ]


class _AdminRequestHandler(RequestHandler):
    """Checks the bearer token before any method runs; answers JSON."""

    def initialize(self, sse_handler: ServerSentEventHandler, token: bytes) -> None:
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


class ConnectionsHandler(_AdminRequestHandler):
    """``GET {prefix}/connections``: the stats of every registered connection."""

    SUPPORTED_METHODS = ("GET",)

    def get(self) -> None:
        self.write_json(200, [asdict(conn.stats()) for conn in self.sse_handler.connections()])


class ConnectionHandler(_AdminRequestHandler):
    """``DELETE {prefix}/connections/<cid>``: stop one connection after ``event: close``."""

    SUPPORTED_METHODS = ("DELETE",)

    def delete(self, cid: str) -> None:
        try:
            self.sse_handler.stop_one(cid, farewell=CLOSE_FAREWELL)
        except UnknownConnectionError as exc:
            self.write_json(404, {"error": str(exc)})
            return
        self.set_status(204)
        self.finish()
