"""Mounting an endpoint: the Tornado routing target that answers its requests.

Why not a ``RequestHandler``: a stream request is detached from Tornado as
soon as it is accepted, so nothing a ``RequestHandler`` offers (output
buffering, transforms, ``finish()``) is ever used, yet building one and
running its ``_execute`` task cost about a third of the CPU of accepting a
stream. Tornado routes a rule whose target is a
:class:`tornado.routing.Router` to that router with the request it has
already parsed, so the endpoint answers from ``headers_received``, before
any handler object exists.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from tornado.http1connection import HTTP1Connection
from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerRequest,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.routing import Router

from .closing import answer_and_close, declares_body
from .response import Answer, accept_stream, answer_head, answer_preflight

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["EventStreamRoute", "StreamRequest"]

log = logging.getLogger("sse_handler")

# A HEAD gets the stream's head; without a body, the connection stays open.


class EventStreamRoute(Router):
    """The target of ``handler.route(pattern)``: GET opens a stream.

    ``HEAD`` answers with the head a GET would get, after the same
    ``authorize()``, and opens nothing. ``OPTIONS`` answers a CORS preflight
    when ``cors_origins`` is set; other methods get 405.
    """

    def __init__(self, handler: ServerSentEventHandler) -> None:
        self.handler = handler

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> HTTPMessageDelegate:
        """Called by Tornado with the parsed request and the route's groups."""
        return StreamRequest(self.handler, request, kwargs.get("path_kwargs") or {})


class StreamRequest(HTTPMessageDelegate):
    """One request to the endpoint.

    A GET that becomes a stream is detached in :meth:`headers_received`. A
    request of another method that declares a body is answered there too,
    and its connection closed: the body is never read, however large or
    slow. Any other answer is written in :meth:`finish`, once Tornado has read
    the whole request (a GET's or HEAD's body is read and ignored), so the
    connection stays open for the next one.
    """

    __slots__ = ("_answer", "handler", "path_kwargs", "request")

    def __init__(
        self,
        handler: ServerSentEventHandler,
        request: HTTPServerRequest,
        path_kwargs: dict[str, bytes | None],
    ) -> None:
        self.handler = handler
        self.request = request
        self.path_kwargs = path_kwargs
        self._answer: Answer | None = None

    def headers_received(
        self,
        start_line: RequestStartLine | ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        method = self.request.method
        if method in ("GET", "HEAD"):
            try:
                path_kwargs = _decoded(self.path_kwargs)
            except UnicodeDecodeError:
                self._answer = Answer(400, reason="Invalid unicode in the path")
                return None
            if method == "HEAD":
                return self._answer_head(path_kwargs)
            accepted = accept_stream(self.request, path_kwargs, self.handler)
            if accepted is None or isinstance(accepted, Answer):
                self._answer = accepted
                return None
            return self._accept_once_authorized(accepted)
        if method == "OPTIONS" and self.handler.cors.enabled:
            self._answer = answer_preflight(self.request, self.handler)
        else:
            allowed = "GET, HEAD, OPTIONS" if self.handler.cors.enabled else "GET, HEAD"
            self._answer = Answer(405, {"Allow": allowed})
        if declares_body(headers):
            self._answer_now_and_close()
        return None

    async def _accept_once_authorized(self, accepted: Awaitable[Answer | None]) -> None:
        self._answer = await accepted

    async def _answer_head(self, path_kwargs: dict[str, str]) -> None:
        self._answer = await answer_head(self.request, path_kwargs, self.handler)

    def _answer_now_and_close(self) -> None:
        """Answer without reading the body: take the connection from Tornado,
        write the answer with ``Connection: close``, close (no reset)."""
        answer, self._answer = self._answer, None
        assert answer is not None
        assert isinstance(self.request.connection, HTTP1Connection)
        stream = self.request.connection.detach()
        answer_and_close(stream, answer.encode(self.request.method))
        answer.log(self.request)

    def finish(self) -> None:
        if self._answer is not None:
            self._answer.write(self.request)


def _decoded(path_kwargs: dict[str, bytes | None]) -> dict[str, str]:
    """Route groups arrive percent-decoded as bytes; unmatched optional ones as None."""
    return {k: v.decode("utf-8") for k, v in path_kwargs.items() if v is not None}
