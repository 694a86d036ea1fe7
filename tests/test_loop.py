"""The event loop the async tests run on is the one SSE_TEST_LOOP names (see conftest.py)."""

from __future__ import annotations

import asyncio

from conftest import LOOP
from tornado.ioloop import IOLoop


async def test_async_tests_run_on_the_loop_sse_test_loop_names() -> None:
    loop = asyncio.get_running_loop()
    expected = "uvloop" if LOOP == "uvloop" else "asyncio"
    assert type(loop).__module__.split(".")[0] == expected, type(loop)
    # Tornado's IOLoop, which the transports register their sockets with, wraps it.
    assert IOLoop.current().asyncio_loop is loop  # type: ignore[attr-defined]
