"""The common Tornado recipe: a RequestHandler per client, write + flush per event.

``python tornado_app.py --port P [--certfile C --keyfile K]`` (with a
certificate: HTTPS, ``ssl_options`` for the ``HTTPServer``). Every client's
handler stays open in a set; ``POST /publish`` formats the frame once and calls
``write()`` + ``flush()`` on each handler. Runs on the same Python and Tornado
as sse_handler.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import tornado.web
from tornado.httpserver import HTTPServer

clients: set[Events] = set()


class Events(tornado.web.RequestHandler):
    def initialize(self) -> None:
        self.closed = asyncio.Event()

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.write(": ok\n\n")
        await self.flush()
        clients.add(self)
        await self.closed.wait()

    def on_connection_close(self) -> None:
        clients.discard(self)
        self.closed.set()


class Publish(tornado.web.RequestHandler):
    def post(self) -> None:
        frame = b"data: " + self.request.body + b"\n\n"
        for client in list(clients):
            client.write(frame)
            # A closed stream fails this future; Tornado retrieves its exception.
            client.flush()
        self.write({"delivered_to": len(clients)})


async def main(port: int, ssl_ctx: ssl.SSLContext | None) -> None:
    app = tornado.web.Application([(r"/events", Events), (r"/publish", Publish)])
    server = HTTPServer(app, ssl_options=ssl_ctx)
    server.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args()
    ssl_ctx = None
    if args.certfile:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.certfile, args.keyfile)
    asyncio.run(main(args.port, ssl_ctx))
