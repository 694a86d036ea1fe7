"""`python -m sse_handler demo --jwt-secret`: the demo contract of issue #13, real processes."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
from redis_server import RedisServer
from support import DemoProcess

from sse_handler.testing import EventStreamClient

SECRET = "demo-secret-of-at-least-32-bytes-long"


def token(ttl: float = 60, secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": "alice", "exp": int(time.time() + ttl), "channels": ["room:*"], **claims}
    encoded: str = jwt.encode(payload, secret, algorithm="HS256")
    return encoded


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@asynccontextmanager
async def demo(*args: str) -> AsyncIterator[DemoProcess]:
    process = await DemoProcess("--jwt-secret", SECRET, *args, keep_stderr=True).start()
    try:
        yield process
    finally:
        await process.stop()
        assert "Traceback" not in process.stderr, process.stderr


async def status(process: DemoProcess, path: str, headers: dict[str, str] | None = None) -> int:
    # HEAD: the answer a GET gets, without keeping a stream open.
    return (await process.fetch(path, "HEAD", headers=headers)).code


async def opened(process: DemoProcess, path: str) -> int:
    """The status of a GET of the stream (which a ticket is spent on; a HEAD is not)."""
    client = await EventStreamClient.connect(process.url + path)
    async with client:
        return client.status


async def ticket_of(process: DemoProcess, value: str, query: str = "") -> str:
    response = await process.fetch("/tickets" + query, "POST", b"", bearer(value))
    assert response.code == 200, response.body
    body = json.loads(response.body)
    assert body["expires_in"] == 30
    assert response.headers["Cache-Control"] == "no-store"
    ticket: str = body["ticket"]
    return ticket


async def test_streams_require_a_valid_token() -> None:
    async with demo() as process:
        for path in ("/events?channel=room:1", "/page/events?channel=room:1"):
            assert await status(process, path) == 401
            assert await status(process, path, bearer(token(secret="x" * 40))) == 401
            assert await status(process, path, bearer(token(ttl=-5))) == 401
            assert await status(process, path, bearer("garbage")) == 401
            good = token()
            assert await status(process, path, bearer(good)) == 200
            assert await status(process, path, {"Cookie": f"sse_token={good}"}) == 200
            assert await status(process, path + f"&token={good}") == 200
            cross = {"Cookie": f"sse_token={good}", "Origin": "https://evil.example"}
            assert await status(process, path, cross) == 403
            assert await status(process, path.replace("room:1", "news"), bearer(good)) == 403
        # No channel asked: the default channel, which room:* does not cover.
        assert await status(process, "/events", bearer(token())) == 403
        client = await EventStreamClient.connect(
            process.url + "/events?channel=room:1", bearer(token(sub="bob"))
        )
        async with client:
            welcome = await client.next_event()
            assert welcome.event == "welcome"


async def test_a_ticket_works_once_within_the_tokens_channels() -> None:
    async with demo() as process:
        assert (await process.fetch("/tickets", "POST", b"")).code == 401
        outside = await process.fetch("/tickets?channel=news", "POST", b"", bearer(token()))
        assert outside.code == 403
        ticket = await ticket_of(process, token())
        assert await status(process, f"/events?channel=news&ticket={ticket}") == 403
        ticket = await ticket_of(process, token())
        client = await EventStreamClient.connect(
            process.url + f"/events?channel=room:1&ticket={ticket}"
        )
        async with client:
            assert client.status == 200
            assert (await client.next_event()).event == "welcome"
            assert await status(process, f"/events?channel=room:1&ticket={ticket}") == 401
        # A ticket for one channel covers that channel only.
        narrow = await ticket_of(process, token(), "?channel=room:2")
        assert await status(process, f"/page/events?channel=room:3&ticket={narrow}") == 403
        narrow = await ticket_of(process, token(), "?channel=room:2")
        assert await status(process, f"/page/events?channel=room:2&ticket={narrow}") == 200
        assert await status(process, "/events?channel=room:2&ticket=forged") == 401


async def test_publish_requires_a_publish_claim() -> None:
    async with demo() as process:
        path = "/publish?channel=room:1"
        assert (await process.fetch(path, "POST", b"hi")).code == 401
        reader = token()
        assert (await process.fetch(path, "POST", b"hi", bearer(reader))).code == 403
        writer = token(publish=["room:*"])
        assert (await process.fetch("/publish", "POST", b"hi", bearer(writer))).code == 403
        client = await EventStreamClient.connect(
            process.url + "/events?channel=room:1", bearer(reader)
        )
        async with client:
            await client.next_event()
            response = await process.fetch(path, "POST", b"hi", bearer(writer))
            assert response.code == 200, response.body
            event = await client.next_event()
            assert event.data == "hi"
        cross = {"Cookie": f"sse_token={writer}", "Origin": "https://evil.example"}
        assert (await process.fetch(path, "POST", b"hi", cross)).code == 403


@pytest.mark.timeout(20)
async def test_a_stream_ends_with_auth_expired_when_its_token_does() -> None:
    async with demo() as process:
        client = await EventStreamClient.connect(
            process.url + "/events?channel=room:1", bearer(token(ttl=3))
        )
        async with client:
            await client.next_event()
            opened = time.monotonic()
            events = await client.wait_closed(timeout=8)
            assert [event.event for event in events] == ["auth_expired"]
            assert client.parser.retry is not None
            assert time.monotonic() - opened > 1


async def test_a_ticket_issued_by_one_process_is_accepted_once_by_another(
    redis_server: RedisServer,
) -> None:
    async with demo("--redis", redis_server.url) as a, demo("--redis", redis_server.url) as b:
        ticket = await ticket_of(a, token())
        client = await EventStreamClient.connect(b.url + f"/events?channel=room:1&ticket={ticket}")
        async with client:
            assert client.status == 200
            assert (await client.next_event()).event == "welcome"
        for process in (a, b):
            assert await status(process, f"/events?channel=room:1&ticket={ticket}") == 401
        ticket = await ticket_of(b, token())
        codes = await asyncio.gather(
            *(opened(p, f"/events?channel=room:1&ticket={ticket}") for p in (a, b, a, b))
        )
        assert sorted(codes) == [200, 401, 401, 401]


async def test_without_jwt_secret_there_are_no_tickets_and_no_auth() -> None:
    process = await DemoProcess().start()
    try:
        assert await status(process, "/events") == 200
        assert (await process.fetch("/tickets", "POST", b"")).code == 404
        assert (await process.publish("hi"))[0] == 200
    finally:
        await process.stop()


async def test_a_short_secret_works_as_written_with_a_warning() -> None:
    # The contract reads `--jwt-secret SECRET`: the demo takes a short secret,
    # and says once that it is weak (the library's JWTVerifier refuses one
    # unless told weak_key=True).
    process = await DemoProcess("--jwt-secret", "SECRET", keep_stderr=True).start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            value = token(secret="SECRET")
        assert await status(process, "/events?channel=room:1", bearer(value)) == 200
        assert await status(process, "/events?channel=room:1", bearer(token())) == 401
    finally:
        await process.stop()
    assert "weak" in process.stderr
    assert "Traceback" not in process.stderr


async def test_the_subject_in_the_admin_api_is_the_tokens_sub_never_the_query() -> None:
    # Issue 14 with issue 13's demo: with --jwt-secret the subject is `sub`;
    # the demo-only ?subject= is ignored.
    async with demo("--admin-token", "t0ken") as process:
        value = token(sub="alice")
        client = await EventStreamClient.connect(
            process.url + "/events?channel=room:1&subject=mallory", bearer(value)
        )
        assert (await client.next_event()).event == "welcome"
        admin = {"Authorization": "Bearer t0ken"}
        listing = json.loads((await process.fetch("/admin/connections", headers=admin)).body)
        assert [c["subject"] for c in listing] == ["alice"]
        stopped = await process.fetch("/admin/subjects/alice", "DELETE", headers=admin)
        assert (stopped.code, json.loads(stopped.body)) == (200, {"stopped": 1})
        await client.wait_closed()
