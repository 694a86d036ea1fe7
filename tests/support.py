"""Shared pieces of the integration tests: a real server on a free port."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler import ServerSentEventHandler
from sse_handler.server import make_server
from sse_handler.testing import EventStreamClient


class TLSCertificate:
    """A throwaway CA and a certificate it issued for 127.0.0.1 and localhost
    (``trustme``): what the test servers serve HTTPS with."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("127.0.0.1", "localhost")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client's default context (verifies the certificate and host name),
        trusting the CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def write_ca(self, folder: Path) -> Path:
        """The CA's certificate as a PEM file (for ``curl --cacert``, ``requests``)."""
        path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def write_demo_files(self, folder: Path) -> DemoTLS:
        """The certificate chain and key as PEM files, for ``demo --tls-cert/--tls-key``."""
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in self.leaf.cert_chain_pems))
        key.write_bytes(self.leaf.private_key_pem.bytes())
        return DemoTLS(cert, key, self.client_context())


@functools.cache
def tls_certificate() -> TLSCertificate:
    """The one certificate of a test run (a key pair costs tens of milliseconds)."""
    return TLSCertificate()


class Server:
    """A server that :func:`serve` started; with ``tls`` its clients speak HTTPS."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        #: The client context that trusts the server's certificate (None: plain HTTP).
        self.tls = tls
        self.url = f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"

    async def stream(
        self, path: str = "/events", headers: dict[str, str] | None = None
    ) -> EventStreamClient:
        return await EventStreamClient.connect(self.url + path, headers, ssl=self.tls)

    def raw_socket(
        self, path: str = "/events", rcvbuf: int = 4096, headers: dict[str, str] | None = None
    ) -> socket.socket:
        """A client that sends its request and then never reads (plain HTTP only:
        a TLS handshake needs the server's loop, see :meth:`frozen_reader`)."""
        assert self.tls is None, "a TLS server's raw client is `await server.frozen_reader()`"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(_request(path, headers))
        return sock

    async def raw_tls_socket(self, path: str = "/events", rcvbuf: int = 4096) -> ssl.SSLSocket:
        """A TLS client that completes the handshake, sends its request and then
        never reads: an ``ssl.SSLSocket`` (blocking, 5 s timeout) over a socket
        with a ``rcvbuf`` receive buffer.

        The handshake runs in a thread while this loop serves the server's side.
        """
        assert self.tls is not None, "a plain server's raw client is server.raw_socket()"
        context = self.tls

        def connect() -> ssl.SSLSocket:
            sock = socket.socket()
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.settimeout(5.0)
                sock.connect(("127.0.0.1", self.port))
                tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
            except BaseException:
                sock.close()
                raise
            tls.sendall(_request(path))
            return tls

        return await asyncio.get_running_loop().run_in_executor(None, connect)

    async def frozen_reader(self, path: str = "/events", rcvbuf: int = 4096) -> socket.socket:
        """:meth:`raw_socket` or, on a TLS server, :meth:`raw_tls_socket`."""
        if self.tls is None:
            return self.raw_socket(path, rcvbuf)
        return await self.raw_tls_socket(path, rcvbuf)


def _request(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@asynccontextmanager
async def serve(
    routes: list[object] | Application,
    *handlers: ServerSentEventHandler,
    tls: bool = False,
    direct: bool = False,
) -> AsyncIterator[Server]:
    """Serve ``routes`` (or an app) on 127.0.0.1 and a free port; shut down after.

    With ``tls`` the server speaks HTTPS only (``HTTPServer(app, ssl_options=...)``)
    with :func:`tls_certificate`, and the :class:`Server`'s clients trust it.
    With ``direct`` it is ``make_server(app, direct_accept=True)``, whose stream requests are read
    off the socket by :mod:`sse_handler.accept`; else Tornado's ``HTTPServer``.
    """
    sock, port = bind_unused_port()
    app = routes if isinstance(routes, Application) else Application(routes)  # type: ignore[arg-type]
    certificate = tls_certificate() if tls else None
    ssl_options = None if certificate is None else certificate.server_context()
    server = (
        make_server(app, ssl_options=ssl_options, direct_accept=True)
        if direct
        else HTTPServer(app, ssl_options=ssl_options)
    )
    server.add_sockets([sock])
    try:
        yield Server(port, None if certificate is None else certificate.client_context())
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
        self.tls = tls
        self._args = args
        self._listen_on(free_port())
        self.keep_stderr = keep_stderr
        self.stderr = ""
        self.proc: asyncio.subprocess.Process | None = None

    def _listen_on(self, port: int) -> None:
        self.port = port
        scheme = "http" if self.tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), *self._args]
        if self.tls is not None:
            self.args += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]

    async def start(self, timeout: float = 15.0) -> DemoProcess:
        # A port free when it was picked may be taken before the demo binds
        # it (another test's server, or the local end of an outgoing
        # connection, which takes ports from the same range): then the demo
        # says "cannot listen on", and starts again on another port.
        for _ in range(3):
            failure = await self._start(timeout)
            if failure is None:
                return self
            if "cannot listen on" not in failure:
                break
            self._listen_on(free_port())
        raise AssertionError(f"demo process exited: {failure}")

    async def _start(self, timeout: float) -> str | None:
        """None once the demo listens; what it said if it exited instead."""
        with tempfile.TemporaryFile() as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sse_handler",
                "demo",
                *self.args,
                stdout=asyncio.subprocess.DEVNULL,
                # Until it listens, to a file (no pipe to drain meanwhile).
                stderr=asyncio.subprocess.PIPE if self.keep_stderr else log,
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                if self.proc.returncode is not None:
                    if self.keep_stderr:
                        assert self.proc.stderr is not None
                        return (await self.proc.stderr.read()).decode(errors="replace")
                    log.seek(0)
                    return log.read().decode(errors="replace")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    if loop.time() > deadline:
                        raise TimeoutError("demo process did not start") from None
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return None

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


class LoggedDemoProcess(DemoProcess):
    """A :class:`DemoProcess` whose stderr is read while it runs, into :attr:`stderr`.

    ``keep_stderr`` alone reads the pipe only at :meth:`stop`: a process that
    logs more than the pipe holds (64 KiB on Linux) meanwhile blocks on its
    next log line. This one drains it as it comes.
    """

    def __init__(self, *args: str) -> None:
        super().__init__(*args, keep_stderr=True)
        self._lines: list[bytes] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 15.0) -> DemoProcess:
        # Starting logs one line: the pipe cannot fill before the drain begins.
        await super().start(timeout)
        assert self.proc is not None and self.proc.stderr is not None
        self._drain = asyncio.ensure_future(self._read(self.proc.stderr))
        return self

    async def _read(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self._lines.append(line)

    async def stop(self) -> int:
        assert self.proc is not None and self._drain is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        await asyncio.wait_for(self._drain, 10)  # EOF: the process closed its stderr
        code = await asyncio.wait_for(self.proc.wait(), 10)
        self.stderr = b"".join(self._lines).decode(errors="replace")
        return code

    def assert_clean_log(self) -> None:
        """After :meth:`stop`: no traceback and no ERROR line in the log."""
        tracebacks = self.stderr.count("Traceback")
        first = max(0, self.stderr.find("Traceback") - 300)
        excerpt = self.stderr[first : first + 4000]
        assert tracebacks == 0, f"{tracebacks} tracebacks in the log, the first:\n{excerpt}"
        assert [line for line in self.stderr.splitlines() if " ERROR " in line] == []
