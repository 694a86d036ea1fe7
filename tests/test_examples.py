"""Examples are real programs: start each one and talk to it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tornado.testing import bind_unused_port

from sse_handler.testing import EventStreamClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def free_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


async def test_welcome_example() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "welcome.py"),
        "--port",
        str(port),
        "--interval",
        "0.05",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"listening" in line
        client = await EventStreamClient.connect(f"http://127.0.0.1:{port}/events")
        welcome = await client.next_event()
        assert welcome.event == "welcome"
        assert welcome.data.startswith('{"connection_id":"')
        tick = await client.next_event()
        assert tick.event == "tick"
        client.close()
    finally:
        proc.terminate()
        await proc.wait()
