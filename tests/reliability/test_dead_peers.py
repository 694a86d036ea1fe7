"""Peers that vanish without FIN or RST (issue 6).

The clients run in a network namespace that the test creates, behind a veth
pair with a private /30 that exists only for the test. The server runs in this
process on the host end, with ``dead_peer_timeout=3``: TCP keepalive after
1 s idle, a probe a second, and ``TCP_USER_TIMEOUT`` 3 s
(``sse_handler.response.tune_socket``).

The link is cut by setting the namespace's end of the pair down: the host end
loses its carrier but keeps its address, route and neighbour entry, so the
server's segments are sent as before and vanish in the veth, as they would on
the way to a phone that left the network. (netem loss would do the same, but
this kernel has no netem; downing the host end instead would remove the route
and make sends fail locally.) The clients' kernel never answers again, so the
server learns nothing but silence.

* Idle streams (no events, no keep-alive comments): the keepalive probes go
  unanswered and the kernel drops the connection once ``TCP_USER_TIMEOUT`` has
  passed since the last segment received.
* Busy streams (events every 100 ms): the data goes unacknowledged and the
  retransmission timer gives up after ``TCP_USER_TIMEOUT``.

Either way the connection must close within about twice the timeout, and
``connection_closed`` run once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from support import wait_until
from tornado.netutil import bind_sockets
from tornado.web import Application

from sse_handler import CloseReason, ServerSentEventConnection, ServerSentEventHandler
from sse_handler.server import make_server

CLIENTS = 20
DEAD_PEER_TIMEOUT = 3.0
#: Beyond 2 x the timeout: the keepalive timer's one-second steps, and the
#: loop's turn to see the socket's error. Measured: 3.05-3.14 s after the cut.
MARGIN = 1.0

#: Run inside the namespace: open the streams, read their heads, then hold
#: them without reading until stdin closes (or the process is killed).
HOLDER = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(f"GET /events HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("closed before the response head")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200 "):
        sys.exit(head[:100].decode("latin-1"))
    held.append(sock)
print("ready", len(held), flush=True)
sys.stdin.read()
"""


@dataclass
class Link:
    netns: str
    host_if: str
    peer_if: str
    host_addr: str
    peer_addr: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unused_slash30() -> ipaddress.IPv4Network:
    """A /30 of 10.199.0.0/16 that no interface here uses."""
    taken = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(
            f"10.199.{random.randrange(256)}.{4 * random.randrange(64)}/30"
        )
        if not any(str(a) + "/" in taken for a in net):
            return net
    raise RuntimeError("no free /30 in 10.199.0.0/16")


@pytest.fixture
def link() -> Iterator[Link]:
    """A namespace and a veth pair into it, removed whatever happens."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    suffix = secrets.token_hex(3)
    net = unused_slash30()
    host_addr, peer_addr = (str(a) for a in list(net.hosts())[:2])
    made = Link(f"sse-rel-{suffix}", f"sseh{suffix}", f"ssep{suffix}", host_addr, peer_addr)
    try:
        ip("netns", "add", made.netns)
        ip("link", "add", made.host_if, "type", "veth", "peer", "name", made.peer_if)
        ip("link", "set", made.peer_if, "netns", made.netns)
        ip("addr", "add", f"{host_addr}/30", "dev", made.host_if)
        ip("link", "set", made.host_if, "up")
        inside = ("netns", "exec", made.netns, "ip")
        ip(*inside, "addr", "add", f"{peer_addr}/30", "dev", made.peer_if)
        ip(*inside, "link", "set", made.peer_if, "up")
        ip(*inside, "link", "set", "lo", "up")
        yield made
    finally:
        # Deleting one end deletes the pair, wherever the other end is.
        for args in (("link", "del", made.host_if), ("netns", "del", made.netns)):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip(*args)


class Recording(ServerSentEventConnection):
    def connection_closed(self, reason: CloseReason) -> None:
        handler = self.handler
        assert isinstance(handler, RecordingHandler)
        handler.closed_calls[self.cid] += 1
        handler.closed[self.cid] = (reason, asyncio.get_running_loop().time())


class RecordingHandler(ServerSentEventHandler):
    connection_class = Recording

    def __init__(self) -> None:
        # keepalive=0: no comment ever leaves for an idle stream, so only the
        # kernel's keepalive probes can find the dead peer.
        super().__init__(dead_peer_timeout=DEAD_PEER_TIMEOUT, keepalive=0)
        self.closed_calls: collections.Counter[str] = collections.Counter()
        self.closed: dict[str, tuple[CloseReason, float]] = {}


@contextlib.asynccontextmanager
async def clients_behind(link: Link, handler: RecordingHandler) -> AsyncIterator[None]:
    """The server on the host end, and CLIENTS streams held from inside the namespace."""
    sockets = bind_sockets(0, link.host_addr)
    port = sockets[0].getsockname()[1]
    server = make_server(Application([handler.route("/events")]))
    server.add_sockets(sockets)
    holder: asyncio.subprocess.Process | None = None
    try:
        holder = await asyncio.create_subprocess_exec(
            *("ip", "netns", "exec", link.netns, sys.executable, "-c", HOLDER),
            *(link.host_addr, str(port), str(CLIENTS)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None
        ready = await asyncio.wait_for(holder.stdout.readline(), 20)
        assert ready.split() == [b"ready", str(CLIENTS).encode()], ready
        await wait_until(lambda: len(handler) == CLIENTS, timeout=10)
        yield
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        server.stop()
        await handler.shutdown(grace=0.1)
        await server.close_all_connections()


async def cut(link: Link) -> float:
    """Take the namespace's end down; returns the loop time just before."""
    start = asyncio.get_running_loop().time()
    down = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", link.netns, "ip", "link", "set", link.peer_if, "down")
    )
    assert await asyncio.wait_for(down.wait(), 10) == 0
    return start


def assert_dropped_once_each(handler: RecordingHandler, cids: list[str], cut_at: float) -> None:
    after = sorted(handler.closed[cid][1] - cut_at for cid in cids)
    reasons = collections.Counter(handler.closed[cid][0] for cid in cids)
    print(f"\ndropped {after[0]:.2f}-{after[-1]:.2f} s after the cut; reasons {dict(reasons)}")
    assert set(handler.closed_calls) == set(cids)
    assert set(handler.closed_calls.values()) == {1}
    assert len(handler) == 0
    assert after[-1] <= 2 * DEAD_PEER_TIMEOUT + MARGIN
    # Not before the timeout: nothing but the timeout could have told.
    assert after[0] >= DEAD_PEER_TIMEOUT * 0.9
    assert set(reasons) == {CloseReason.DEAD_PEER}


@pytest.mark.timeout(40)
async def test_idle_streams_to_a_vanished_peer_are_dropped(link: Link) -> None:
    handler = RecordingHandler()
    async with clients_behind(link, handler):
        conns = handler.connections()
        heads = [conn.bytes_sent for conn in conns]
        cut_at = await cut(link)
        await wait_until(lambda: len(handler) == 0, timeout=2 * DEAD_PEER_TIMEOUT + 5)
        # Idle indeed: the server wrote nothing after the response head.
        assert [conn.bytes_sent for conn in conns] == heads
        assert_dropped_once_each(handler, [conn.cid for conn in conns], cut_at)


@pytest.mark.timeout(40)
async def test_busy_streams_to_a_vanished_peer_are_dropped(link: Link) -> None:
    handler = RecordingHandler()
    async with clients_behind(link, handler):
        cids = handler.connection_ids()
        loop = asyncio.get_running_loop()
        sent = 0

        async def publish() -> None:
            nonlocal sent
            while len(handler) and sent < 1000:
                handler.send_all(event="tick", id=str(sent), data="x" * 100)
                sent += 1
                await asyncio.sleep(0.1)

        publishing = asyncio.ensure_future(publish())
        try:
            await wait_until(lambda: sent >= 5, timeout=5)  # a stream in full flow
            cut_at = await cut(link)
            await wait_until(lambda: len(handler) == 0, timeout=2 * DEAD_PEER_TIMEOUT + 5)
        finally:
            publishing.cancel()
        print(f"\n{sent} events sent, the last {loop.time() - cut_at:.1f} s after the cut")
        assert_dropped_once_each(handler, cids, cut_at)
