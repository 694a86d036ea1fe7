"""Function-style endpoints for one-off streams, like microdot's ``with_sse``.

::

    @with_sse
    async def clock(request, sse):
        for i in range(10):
            sse.send(data=str(i))
            await asyncio.sleep(1)

    app = Application([clock.route(r"/clock")])

The function runs as the connection's source once it is registered; when it
returns the stream ends (after what it sent is written), and when the client
goes away the function is cancelled. ``sse`` is the
:class:`ServerSentEventConnection`, so ``sse.send(...)``, ``await sse.flush()``
and ``sse.is_active`` are all there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Unpack, overload

from tornado.httputil import HTTPServerRequest

from .connection import Sendable, ServerSentEventConnection
from .handler import HandlerSettings, ServerSentEventHandler
from .writer import Transport

__all__ = ["FunctionEndpoint", "StreamFunction", "with_sse"]

StreamFunction = Callable[[HTTPServerRequest, ServerSentEventConnection], Awaitable[None]]


class _FunctionConnection(ServerSentEventConnection):
    """Runs the endpoint's function as this connection's source: the function
    sends with ``send()``; when it returns, the source is done."""

    def __init__(self, *args: Any, request: HTTPServerRequest, fn: StreamFunction) -> None:
        super().__init__(*args)
        self._request = request
        self._fn = fn

    async def poll_data(self) -> Sendable | None:
        await self._fn(self._request, self)
        return None  # the stream ends once what the function sent is written


class FunctionEndpoint(ServerSentEventHandler):
    """A handler whose every connection runs one async function ``(request, sse)``."""

    def __init__(self, fn: StreamFunction, **settings: Unpack[HandlerSettings]) -> None:
        super().__init__(**settings)
        self.fn = fn

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        return _FunctionConnection(
            self, cid, transport, request, last_event_id, request=request, fn=self.fn
        )


@overload
def with_sse(fn: StreamFunction, /, **settings: Unpack[HandlerSettings]) -> FunctionEndpoint: ...
@overload
def with_sse(
    fn: None = None, /, **settings: Unpack[HandlerSettings]
) -> Callable[[StreamFunction], FunctionEndpoint]: ...
def with_sse(
    fn: StreamFunction | None = None, /, **settings: Unpack[HandlerSettings]
) -> FunctionEndpoint | Callable[[StreamFunction], FunctionEndpoint]:
    """Turn ``async def fn(request, sse)`` into an endpoint; settings as keywords.

    Use bare (``@with_sse``) or with handler settings (``@with_sse(keepalive=5)``).
    """
    if fn is not None:
        return FunctionEndpoint(fn, **settings)
    return lambda f: FunctionEndpoint(f, **settings)
