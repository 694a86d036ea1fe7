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

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, overload

from tornado.httputil import HTTPServerRequest

from .connection import CloseReason, ServerSentEventConnection
from .errors import ConnectionClosedError
from .handler import ServerSentEventHandler

__all__ = ["FunctionEndpoint", "StreamFunction", "with_sse"]

log = logging.getLogger("sse_handler")

StreamFunction = Callable[[HTTPServerRequest, ServerSentEventConnection], Awaitable[None]]


class _FunctionConnection(ServerSentEventConnection):
    """Runs the endpoint's function as this connection's source."""

    def __init__(self, *args: Any, request: HTTPServerRequest, fn: StreamFunction) -> None:
        super().__init__(*args)
        self._request = request
        self._fn = fn

    def registered(self) -> None:
        # Kept in the slot the connection cancels on close.
        self._source_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._fn(self._request, self)
        except asyncio.CancelledError:
            raise
        except ConnectionClosedError:
            return
        except Exception:
            log.exception("Uncaught exception in the stream function of %s", self.cid)
            self._close(CloseReason.HOOK_ERROR)
            return
        self._stop(CloseReason.SOURCE_DONE, None, None)


class FunctionEndpoint(ServerSentEventHandler):
    """A handler whose every connection runs one async function ``(request, sse)``."""

    def __init__(self, fn: StreamFunction, **settings: Any) -> None:
        super().__init__(**settings)
        self.fn = fn

    def get_connection_impl(
        self, request: HTTPServerRequest, cid: str, sock: Any, last_event_id: str | None
    ) -> ServerSentEventConnection:
        return _FunctionConnection(
            self, cid, sock, request, last_event_id, request=request, fn=self.fn
        )


@overload
def with_sse(fn: StreamFunction, /, **settings: Any) -> FunctionEndpoint: ...
@overload
def with_sse(
    fn: None = None, /, **settings: Any
) -> Callable[[StreamFunction], FunctionEndpoint]: ...
def with_sse(
    fn: StreamFunction | None = None, /, **settings: Any
) -> FunctionEndpoint | Callable[[StreamFunction], FunctionEndpoint]:
    """Turn ``async def fn(request, sse)`` into an endpoint; settings as keywords.

    Use bare (``@with_sse``) or with handler settings (``@with_sse(keepalive=5)``).
    """
    if fn is not None:
        return FunctionEndpoint(fn, **settings)
    return lambda f: FunctionEndpoint(f, **settings)
