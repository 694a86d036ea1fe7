"""Listing and stopping connections, from admin code and from the admin API.

Admin code: a janitor task stops every connection that has been open longer
than ``--max-age`` seconds, with a farewell ``event: reconnect`` and a jittered
``retry:`` hint (so clients reconnect spread out, maybe to another process),
and the listing printed. It does not send ``event: close``: for the admin API
and the demo page that means "stop for good", and a page closes its
``EventSource`` on it. The admin HTTP API (``sse_handler.admin``) lists connections and
stops one; it needs ``Authorization: Bearer <token>``.

Run ``python examples/admin.py --port 8888 --token s3cret``, then::

    curl -N localhost:8888/events
    curl -H 'Authorization: Bearer s3cret' localhost:8888/admin/connections
    curl -X DELETE -H 'Authorization: Bearer s3cret' localhost:8888/admin/connections/<cid>
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import tornado.web

from sse_handler import ServerSentEvent, ServerSentEventHandler
from sse_handler.admin import admin_routes


async def janitor(events: ServerSentEventHandler, max_age: float, period: float) -> None:
    """Admin code: list the connections, stop those older than ``max_age``."""
    while True:
        await asyncio.sleep(period)
        now = time.time()
        for cid in events.connection_ids():
            conn = events.get_connection(cid)
            age = now - conn.connected_at
            print(f"{cid} {conn.remote_ip} age={age:.1f}s sent={conn.events_sent}", flush=True)
            if age > max_age:
                events.stop_one(
                    cid,
                    ServerSentEvent(event="reconnect", data="max age reached"),
                    retry=random.randint(500, 2000),
                )


async def main(port: int, token: str, max_age: float) -> None:
    events = ServerSentEventHandler()
    app = tornado.web.Application([events.route(r"/events"), *admin_routes(events, token)])
    app.listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/events", flush=True)
    await janitor(events, max_age, period=min(1.0, max_age / 2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--token", required=True)
    parser.add_argument("--max-age", type=float, default=60.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.token, args.max_age))
