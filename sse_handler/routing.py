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

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerRequest,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.routing import Router

from .response import Answer, accept_stream, answer_preflight

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["EventStreamRoute"]


class EventStreamRoute(Router):
    """The target of ``handler.route(pattern)``: GET opens a stream.

    ``OPTIONS`` answers a CORS preflight when ``cors_origins`` is set; other
    methods get 405.
    """

    def __init__(self, handler: ServerSentEventHandler) -> None:
        self.handler = handler

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> HTTPMessageDelegate:
        """Called by Tornado with the parsed request and the route's groups."""
        return _Request(self.handler, request, kwargs.get("path_kwargs") or {})


class _Request(HTTPMessageDelegate):
    """One request to the endpoint; a body, if any, is read and ignored.

    A GET that becomes a stream is detached in :meth:`headers_received`; any
    other answer is written in :meth:`finish`, once Tornado has read the whole
    request, so the connection stays open for the next one.
    """

    __slots__ = ("answer", "handler", "path_kwargs", "request")

    def __init__(
        self,
        handler: ServerSentEventHandler,
        request: HTTPServerRequest,
        path_kwargs: dict[str, bytes | None],
    ) -> None:
        self.handler = handler
        self.request = request
        self.path_kwargs = path_kwargs
        self.answer: Answer | None = None

    def headers_received(
        self,
        start_line: RequestStartLine | ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        method = self.request.method
        if method == "GET":
            try:
                path_kwargs = _decoded(self.path_kwargs)
            except UnicodeDecodeError:
                self.answer = Answer(400, reason="Invalid unicode in the path")
                return None
            return self._accept(path_kwargs)
        if method == "OPTIONS":
            self.answer = answer_preflight(self.request, self.handler)
        else:
            allowed = "GET, OPTIONS" if self.handler.cors.enabled else "GET"
            self.answer = Answer(405, {"Allow": allowed})
        return None

    async def _accept(self, path_kwargs: dict[str, str]) -> None:
        self.answer = await accept_stream(self.request, path_kwargs, self.handler)

    def finish(self) -> None:
        if self.answer is not None:
            self.answer.write(self.request)


def _decoded(path_kwargs: dict[str, bytes | None]) -> dict[str, str]:
    """Route groups arrive percent-decoded as bytes; unmatched optional ones as None."""
    return {k: v.decode("utf-8") for k, v in path_kwargs.items() if v is not None}
