"""Shared pieces of the integration tests: a real server on a free port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler import ServerSentEventHandler
from sse_handler.testing import EventStreamClient


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    async def stream(
        self, path: str = "/events", headers: dict[str, str] | None = None
    ) -> EventStreamClient:
        return await EventStreamClient.connect(self.url + path, headers)

    def raw_socket(self, path: str = "/events", rcvbuf: int = 4096) -> socket.socket:
        """A client that sends its request and then never reads."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return sock


@asynccontextmanager
async def serve(routes: list[object], *handlers: ServerSentEventHandler) -> AsyncIterator[Server]:
    """Serve ``routes`` on 127.0.0.1 and a free port; shut everything down after."""
    sock, port = bind_unused_port()
    server = HTTPServer(Application(routes))  # type: ignore[arg-type]
    server.add_sockets([sock])
    try:
        yield Server(port)
    finally:
        server.stop()
        for handler in handlers:
            await handler.shutdown(grace=0.2)
        await server.close_all_connections()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on the loop until it holds; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.005)
