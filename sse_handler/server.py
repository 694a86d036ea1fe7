"""An ``HTTPServer`` with settings fit for event streams.

Tornado waits an hour by default for a request head on a new connection; a
flood of TCP connections that never send a request would hold that many
sockets for that long. :func:`make_server` bounds it.
"""

from __future__ import annotations

from typing import Any

from tornado.httpserver import HTTPServer
from tornado.web import Application

__all__ = ["make_server"]


def make_server(
    app: Application,
    *,
    header_timeout: float = 10.0,
    max_header_size: int = 16 * 1024,
    **kwargs: Any,
) -> HTTPServer:
    """``HTTPServer(app)`` that drops a connection sending no complete request
    head within ``header_timeout`` seconds, and refuses heads over
    ``max_header_size`` bytes. Other keywords go to ``HTTPServer``.

    Once a stream is accepted the connection leaves Tornado, so these bounds
    apply to the request phase only.
    """
    return HTTPServer(
        app,
        idle_connection_timeout=header_timeout,
        max_header_size=max_header_size,
        **kwargs,
    )
