"""SilenceWatch on its own, with a future standing in for a read (the Redis
tests run it on a real Pub/Sub connection, silent and quiet)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sse_handler.brokers.silence import SilenceWatch


async def _read_once(watch: SilenceWatch, read: asyncio.Future[str]) -> str:
    watch.start()
    watch.listening = True
    try:
        return await read
    except asyncio.CancelledError:
        if watch.cut():
            raise TimeoutError("no answer to the probe") from None
        raise
    finally:
        watch.listening = False
        watch.stop()


async def test_a_read_nothing_answers_is_probed_once_then_cut() -> None:
    probes: list[float] = []
    watch = SilenceWatch(0.05, 0.1, lambda: probes.append(time.monotonic()))
    read: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="probe"):
        await asyncio.wait_for(_read_once(watch, read), 5)
    assert len(probes) == 1
    assert probes[0] - started >= 0.05
    assert time.monotonic() - probes[0] >= 0.1


async def test_a_read_the_probe_answers_goes_on() -> None:
    loop = asyncio.get_running_loop()
    read: asyncio.Future[str] = loop.create_future()
    watch = SilenceWatch(0.05, 1.0, lambda: loop.call_soon(read.set_result, "PONG"))
    assert await asyncio.wait_for(_read_once(watch, read), 5) == "PONG"


async def test_a_close_during_the_cut_is_a_cancellation_not_a_failure() -> None:
    loop = asyncio.get_running_loop()
    read: asyncio.Future[str] = loop.create_future()
    watch = SilenceWatch(0.01, 0.01, lambda: None)
    task = asyncio.ensure_future(_read_once(watch, read))
    cut = asyncio.Event()

    def cancel_too() -> None:
        # Right after the watch cut the read, before the task runs again.
        if read.done() or task.cancelling():
            task.cancel()
            cut.set()
        else:
            loop.call_soon(cancel_too)

    loop.call_soon(cancel_too)
    await asyncio.wait_for(cut.wait(), 5)
    with pytest.raises(asyncio.CancelledError):
        await task
