"""shutdown(grace) under load, with Redis: farewell, jittered retry, nothing lost."""

from __future__ import annotations

import asyncio

import pytest
from redis_server import RedisServer
from support import DemoProcess

from sse_handler.testing import EventStreamClient

CLIENTS = 100
EVENTS = 200


@pytest.mark.timeout(120)
async def test_shutdown_under_load_loses_nothing_for_resuming_clients(
    redis_server: RedisServer,
) -> None:
    leaving = DemoProcess("--redis", redis_server.url)
    staying = DemoProcess("--redis", redis_server.url)
    await asyncio.gather(leaving.start(), staying.start())
    accepted: list[str] = []
    try:
        clients = [
            await EventStreamClient.connect(leaving.url + "/events?channel=s")
            for _ in range(CLIENTS)
        ]
        for client in clients:
            assert (await client.next_event()).event == "welcome"

        async def publish() -> None:
            for i in range(EVENTS):
                status, _ = await staying.publish(str(i), channel="s")
                assert status == 200
                accepted.append(str(i))

        publisher = asyncio.ensure_future(publish())
        # Let part of the stream through, then stop the process the clients are on.
        await clients[0].events(EVENTS // 4, timeout=30)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert leaving.proc is not None
        leaving.proc.terminate()
        assert await asyncio.wait_for(leaving.proc.wait(), 10) == 0
        # The demo's grace is 2 s; the process is gone within it (plus start-up
        # of the interpreter's exit).
        assert loop.time() - start < 3.0

        received: list[list[str]] = []
        hints: set[int] = set()
        for n, client in enumerate(clients):
            before = await client.wait_closed()
            farewell = [e for e in before if e.event == "shutdown"]
            assert len(farewell) == 1, [e.event for e in before]
            assert client.parser.retry is not None
            hints.add(client.parser.retry)
            data = [e.data for e in before if e.event == "message"]
            if n == 0:
                data = [str(i) for i in range(EVENTS // 4)] + data
            received.append(data)
        assert len(hints) > 10  # jittered per connection

        # Every client resumes on the other process from its last id.
        resumed = []
        for client in clients:
            resumed.append(
                await EventStreamClient.connect(
                    staying.url + "/events?channel=s", {"Last-Event-ID": client.last_event_id}
                )
            )
        await publisher
        for data, client in zip(received, resumed, strict=True):
            while len(data) < EVENTS:
                event = await client.next_event(timeout=20)
                assert event.event != "reset"
                if event.event == "message":
                    data.append(event.data)
            client.close()
        for data in received:
            assert data == accepted
    finally:
        await asyncio.gather(leaving.stop(), staying.stop())
