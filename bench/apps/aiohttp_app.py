"""aiohttp-sse: ``sse_response`` in a handler, one queue per client.

``python aiohttp_app.py --port P``. ``POST /publish`` puts the body into every
client's ``asyncio.Queue``; each client's handler awaits it and ``send()``s it
(aiohttp-sse's documented form).
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from aiohttp_sse import sse_response

subscribers: set[asyncio.Queue[str]] = set()


async def events(request: web.Request) -> web.StreamResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()
    async with sse_response(request) as resp:
        subscribers.add(queue)
        try:
            while resp.is_connected():
                await resp.send(await queue.get())
        finally:
            subscribers.discard(queue)
    return resp


async def publish(request: web.Request) -> web.Response:
    data = await request.text()
    for queue in subscribers:
        queue.put_nowait(data)
    return web.json_response({"delivered_to": len(subscribers)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    app = web.Application()
    app.add_routes([web.get("/events", events), web.post("/publish", publish)])
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, access_log=None, print=None)


if __name__ == "__main__":
    main()
