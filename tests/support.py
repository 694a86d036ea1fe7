"""Shared pieces of the integration tests: a real server on a free port."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
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

    def raw_socket(
        self, path: str = "/events", rcvbuf: int = 4096, headers: dict[str, str] | None = None
    ) -> socket.socket:
        """A client that sends its request and then never reads."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        lines = [f"GET {path} HTTP/1.1", "Host: x"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return sock


@asynccontextmanager
async def serve(
    routes: list[object] | Application, *handlers: ServerSentEventHandler
) -> AsyncIterator[Server]:
    """Serve ``routes`` (or an app) on 127.0.0.1 and a free port; shut down after."""
    sock, port = bind_unused_port()
    app = routes if isinstance(routes, Application) else Application(routes)  # type: ignore[arg-type]
    server = HTTPServer(app)
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


def parse_head(head: bytes) -> tuple[int, HTTPHeaders]:
    """The status and the headers of a response head read off a raw socket."""
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    return int(status_line.split(" ")[1]), HTTPHeaders.parse(rest)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if that takes longer
    than ``timeout`` or ends in a reset instead of a close."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def trickle(writer: asyncio.StreamWriter, piece: bytes, every: float = 0.05) -> None:
    """A slow client: one small piece of a request body every ``every`` seconds,
    until the server stops taking them or the task is cancelled."""
    try:
        while True:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(every)
    except OSError:
        return


def free_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


@dataclass(frozen=True)
class DemoTLS:
    """A certificate for the demo: its PEM files, and a client context that trusts it."""

    cert: Path
    key: Path
    client: ssl.SSLContext


class DemoProcess:
    """``python -m sse_handler demo`` as a real subprocess.

    With ``tls`` it serves HTTPS (``--tls-cert``/``--tls-key``), and :attr:`url`,
    :meth:`fetch` and :meth:`publish` use HTTPS with ``tls.client``. With
    ``keep_stderr`` the process's log is in :attr:`stderr` after :meth:`stop`.
    """

    def __init__(self, *args: str, tls: DemoTLS | None = None, keep_stderr: bool = False) -> None:
        self.port = free_port()
        self.tls = tls
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), *args]
        if tls is not None:
            self.args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        self.keep_stderr = keep_stderr
        self.stderr = ""
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 15.0) -> DemoProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sse_handler",
            "demo",
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE if self.keep_stderr else asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.proc.returncode is None, "demo process exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError("demo process did not start") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return self

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        _, stderr = await asyncio.wait_for(self.proc.communicate(), 10)
        self.stderr = (stderr or b"").decode(errors="replace")
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def fetch(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> HTTPResponse:
        """One request to the demo (HTTPS with ``tls``); header values may be non-ASCII."""
        http = AsyncHTTPClient()
        return await http.fetch(
            self.url + path,
            method=method,
            body=body,
            headers={k: v.encode("utf-8").decode("latin-1") for k, v in (headers or {}).items()},
            raise_error=False,
            ssl_options=None if self.tls is None else self.tls.client,
        )

    async def publish(self, data: str, channel: str = "default") -> tuple[int, dict[str, Any]]:
        response = await self.fetch(
            f"/publish?channel={channel}", method="POST", body=data.encode()
        )
        return response.code, json.loads(response.body) if response.body else {}
