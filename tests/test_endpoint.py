"""Function-style endpoints (microdot's with_sse)."""

from __future__ import annotations

import asyncio

from support import serve, wait_until
from tornado.httputil import HTTPServerRequest

from sse_handler import CloseReason, ServerSentEventConnection, with_sse


async def test_function_endpoint_streams_then_ends() -> None:
    @with_sse
    async def countdown(request: HTTPServerRequest, sse: ServerSentEventConnection) -> None:
        start = int(request.query_arguments.get("from", [b"3"])[0])
        for i in range(start, 0, -1):
            sse.send(data={"n": i}, event="tick", id=str(i))
            await asyncio.sleep(0)
        sse.send(data="liftoff")

    async with serve([countdown.route("/countdown")], countdown) as server:
        client = await server.stream("/countdown?from=5")
        events = await client.wait_closed()
        assert [e.data for e in events] == [
            '{"n":5}',
            '{"n":4}',
            '{"n":3}',
            '{"n":2}',
            '{"n":1}',
            "liftoff",
        ]
        assert [e.id for e in events[:5]] == ["5", "4", "3", "2", "1"]
        await wait_until(lambda: len(countdown) == 0)


async def test_function_is_cancelled_when_the_client_leaves() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @with_sse(keepalive=0)
    async def forever(request: HTTPServerRequest, sse: ServerSentEventConnection) -> None:
        started.set()
        try:
            while True:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve([forever.route("/forever")], forever) as server:
        client = await server.stream("/forever")
        await asyncio.wait_for(started.wait(), 5)
        conn = forever.connections()[0]
        client.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        assert conn.close_reason == CloseReason.CLIENT_CLOSED


async def test_function_that_raises_closes_its_stream_only() -> None:
    @with_sse
    async def broken(request: HTTPServerRequest, sse: ServerSentEventConnection) -> None:
        sse.send(data="before")
        if request.query_arguments.get("boom"):
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async with serve([broken.route("/s")], broken) as server:
        good = await server.stream("/s")
        assert (await good.next_event()).data == "before"
        bad = await server.stream("/s?boom=1")
        assert [e.data for e in await bad.wait_closed()] == ["before"]
        await wait_until(lambda: len(broken) == 1)
        assert broken.connections()[0].is_active
        good.close()
