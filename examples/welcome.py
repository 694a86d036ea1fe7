"""The README example: a handler whose connections greet each client.

Run ``python examples/welcome.py --port 8888`` and ``curl -N localhost:8888/events``;
every 2 s all clients also get a ``tick`` through ``send_all``.
"""

from __future__ import annotations

import argparse
import asyncio

import tornado.web

from sse_handler import ServerSentEventConnection, ServerSentEventHandler


class Greeting(ServerSentEventConnection):
    def registered(self) -> None:
        self.send(event="welcome", data={"connection_id": self.cid})


class Events(ServerSentEventHandler):
    connection_class = Greeting


async def main(port: int, interval: float) -> None:
    events = Events()
    app = tornado.web.Application([events.route(r"/events")])
    app.listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/events", flush=True)
    n = 0
    while True:
        await asyncio.sleep(interval)
        n += 1
        events.send_all(event="tick", data=str(n), id=str(n))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.interval))
