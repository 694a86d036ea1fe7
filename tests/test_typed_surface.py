"""The typed surface: settings and event fields a checker refuses, and the
values that would slip past a checker refused at run time."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Collection
from pathlib import Path

import pytest
from mypy import api as mypy_api
from support import serve, wait_until
from tornado.httputil import HTTPServerRequest

from sse_handler import ConnectionStats, ServerSentEventHandler

MISTAKES = """
from sse_handler import ServerSentEventConnection, ServerSentEventHandler

handler = ServerSentEventHandler(keepalive="5")
handler2 = ServerSentEventHandler(keep_alive=5.0)

def hook(conn: ServerSentEventConnection) -> None:
    conn.send(dat="typo")
    conn.send(data={"ok": 1}, retry="10")
    handler.send_all(event=3)
"""


def test_mypy_refuses_mistyped_settings_and_event_fields(tmp_path: Path) -> None:
    source = tmp_path / "mistakes.py"
    source.write_text(MISTAKES)
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--show-error-codes", str(source)]
    )
    assert status == 1, out
    errors = {int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line}
    # One error on each line of a mistake, none elsewhere.
    assert errors == {4, 5, 8, 9, 10}, out


def test_cors_origins_and_kept_headers_as_a_single_string_are_refused() -> None:
    with pytest.raises(TypeError, match="cors_origins"):
        ServerSentEventHandler(cors_origins="https://app.example")
    with pytest.raises(TypeError, match="kept_headers"):
        ServerSentEventHandler(kept_headers="Origin")


async def test_authorize_returning_a_string_is_a_clear_type_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Mistaken(ServerSentEventHandler):
        def authorize(self, request: HTTPServerRequest) -> Collection[str]:
            return "room-1"  # meant ["room-1"]: a str would be read as 6 channels

    handler = Mistaken()
    async with serve([handler.route("/events")], handler) as server:
        with caplog.at_level(logging.ERROR, logger="sse_handler"):
            client = await server.stream()
            assert client.status == 500
        assert "TypeError: authorize() returned a string" in caplog.text
        assert len(handler) == 0
        client.close()


async def test_connection_stats_is_a_dataclass() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        stats = handler.connections()[0].stats()
        assert isinstance(stats, ConnectionStats)
        assert (stats.state, stats.path, stats.channels) == ("live", "/events", ["default"])
        client.close()


async def test_memory_per_stream_does_not_grow_with_the_request_head() -> None:
    """15 KB request heads once cost ~75 KiB more per stream, kept for its life."""
    handler = ServerSentEventHandler()
    n = 100

    async def traced_per_stream(padding: int) -> float:
        headers = {"X-Padding": "p" * padding}
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            clients = [await server.stream(headers=headers) for _ in range(n)]
            await wait_until(lambda: len(handler) == n)
            await wait_until(lambda: all(c.state.name == "LIVE" for c in handler.connections()))
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        for client in clients:
            client.close()
        await wait_until(lambda: len(handler) == 0)
        return (after - before) / n

    async with serve([handler.route("/events")], handler) as server:
        await traced_per_stream(0)  # warm-up: caches, first-use allocations
        small = await traced_per_stream(10)
        large = await traced_per_stream(15_000)
    # The clients in this process hold their own small buffers; the server
    # keeps nothing of the head once the stream is registered.
    assert large - small < 2048, (small, large)


async def test_bounds_set_after_construction_reach_new_connections() -> None:
    handler = ServerSentEventHandler()
    handler.write_timeout = 0.5
    handler.max_queue_bytes = 4096
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        assert handler.write_limits.write_timeout == 0.5
        assert handler.write_limits.max_queue_bytes == 4096
        client.close()
