"""Several processes on one port, one Redis: every client gets every event.

The parent starts ``--processes`` children; each binds the same port with
SO_REUSEPORT (the kernel spreads connections over them) and uses one
``RedisBroker``. Publish through any process, read from any process; a client
that reconnects to another process resumes there with Last-Event-ID.

Run ``redis-server`` and ``python examples/multiprocess.py --redis redis://127.0.0.1:6379/0``,
then ``curl -N 'localhost:8888/events?channel=news'`` and
``curl --data-binary hi 'localhost:8888/publish?channel=news'``.
SIGTERM or SIGINT to the parent stops them all gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from sse_handler.brokers.redis import RedisBroker
from sse_handler.demo.app import make_app


async def child(port: int, redis_url: str) -> None:
    broker = RedisBroker(redis_url)
    app, handler = make_app(broker=broker)
    server = HTTPServer(app)
    server.add_sockets(bind_sockets(port, "127.0.0.1", reuse_port=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"process {os.getpid()} serving http://127.0.0.1:{port}/", flush=True)
    await stop.wait()
    server.stop()
    await handler.shutdown(grace=2)
    await broker.close()


def parent(port: int, redis_url: str, processes: int) -> int:
    argv = [sys.executable, __file__, "--port", str(port), "--redis", redis_url, "--child"]
    children = [subprocess.Popen(argv) for _ in range(processes)]

    def forward(signum: int, _frame: object) -> None:
        for proc in children:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [proc.wait() for proc in children]
    return max(codes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--redis", required=True, metavar="URL")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.port, args.redis))
    else:
        sys.exit(parent(args.port, args.redis, args.processes))
