"""Runs ``async def`` tests on a fresh asyncio loop, each under a time limit.

No plugin needed: every coroutine test gets its own loop (an
``asyncio.Runner``) with a timeout (default 30 s, or
``@pytest.mark.timeout(seconds)``), so a test that waits for an event that
never comes fails instead of hanging.

``SSE_TEST_LOOP=uvloop`` (``tox -e uvloop``) runs each of them on a loop of
uvloop's instead of asyncio's own; ``asyncio`` (or unset) is the default.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from redis_server import ENGINES, RedisCluster, RedisServer, cluster_ports
from tornado.testing import bind_unused_port

#: The event loop of the async tests, by name (the environment's SSE_TEST_LOOP).
LOOP = os.environ.get("SSE_TEST_LOOP", "") or "asyncio"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if LOOP == "asyncio":
        return None  # asyncio.Runner's own: a new loop of the default policy
    if LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise pytest.UsageError(f"SSE_TEST_LOOP={LOOP!r}: expected 'asyncio' or 'uvloop'")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): time limit of an async test")
    _loop_factory()  # an unknown SSE_TEST_LOOP, or uvloop missing, stops the run here


def pytest_report_header() -> str:
    return f"event loop of the async tests: {LOOP} (SSE_TEST_LOOP)"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    marker = pyfuncitem.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker else 30.0
    kwargs: dict[str, Any] = {
        name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames
    }

    async def run() -> None:
        await asyncio.wait_for(pyfuncitem.obj(**kwargs), timeout)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run())
    return True


@pytest.fixture(params=ENGINES)
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A fresh real server on a free port for one test: Redis 6.2, then Valkey 8."""
    sock, port = bind_unused_port()
    sock.close()
    server = RedisServer(port, request.param)
    server.start()
    try:
        yield server
    finally:
        server.close()


# The long fuzzing run (tox -e fuzz): HYPOTHESIS_PROFILE=fuzz.
settings.register_profile("fuzz", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=ENGINES)
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """A fresh 3-shard Redis Cluster on free localhost ports: Redis 6.2, then Valkey 8."""
    for attempt in range(3):
        cluster = RedisCluster(cluster_ports(3), request.param)
        try:
            cluster.start()
        except RuntimeError:
            # A port taken between choosing it and the node binding it (the
            # node exits 1): another set of ports, a bounded number of times.
            cluster.close()
            if attempt == 2:
                raise
            continue
        try:
            yield cluster
        finally:
            cluster.close()
        return
