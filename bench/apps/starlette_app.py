"""sse-starlette: an ``EventSourceResponse`` over an async generator, one queue per client.

``uvicorn --app-dir bench/apps starlette_app:app --loop uvloop --http httptools``.
``POST /publish`` puts the body into every client's ``asyncio.Queue``; each
client's generator yields it as ``{"data": ...}`` (sse-starlette's documented form).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

subscribers: set[asyncio.Queue[str]] = set()


async def events(request: Request) -> EventSourceResponse:
    async def stream() -> AsyncIterator[dict[str, str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        subscribers.add(queue)
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            subscribers.discard(queue)

    return EventSourceResponse(stream())


async def publish(request: Request) -> JSONResponse:
    data = (await request.body()).decode()
    for queue in subscribers:
        queue.put_nowait(data)
    return JSONResponse({"delivered_to": len(subscribers)})


app = Starlette(routes=[Route("/events", events), Route("/publish", publish, methods=["POST"])])
