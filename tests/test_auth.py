"""The auth kit with real parts: PyJWT tokens, real keys, a real JWKS endpoint, real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Collection
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis_server import RedisServer
from support import free_port, serve
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httputil import HTTPServerRequest
from tornado.web import Application, RequestHandler

from sse_handler import Grant, ServerSentEventConnection, ServerSentEventHandler
from sse_handler.auth import (
    JWTVerifier,
    MemoryTickets,
    RedisTickets,
    StreamAuth,
    TicketStore,
    tickets_for,
)
from sse_handler.auth.jwt import InvalidToken
from sse_handler.brokers.redis import RedisBroker

SECRET = "a-secret-long-enough-for-hs256-tokens!"


def token(
    key: Any = SECRET,
    algorithm: str = "HS256",
    ttl: float = 60,
    channels: list[str] | None = None,
    **claims: Any,
) -> str:
    payload = {"sub": "alice", "exp": int(time.time() + ttl), **claims}
    if channels is not None:
        payload["channels"] = channels
    else:
        payload.setdefault("channels", ["room:*"])
    encoded: str = jwt.encode(payload, key, algorithm=algorithm)
    return encoded


class Conn(ServerSentEventConnection):
    def registered(self) -> None:
        self.send(event="welcome", data={"subject": self.subject})


class Events(ServerSentEventHandler):
    connection_class = Conn

    def __init__(self, auth: StreamAuth, **settings: Any) -> None:
        super().__init__(**settings)
        self.auth = auth

    async def authorize(self, request: HTTPServerRequest) -> Grant:
        return await self.auth.authorize(request, self.cors)


def kit(store: TicketStore | None = None, **options: Any) -> StreamAuth:
    verifier = JWTVerifier(key=SECRET)
    return StreamAuth(jwt=verifier, tickets=store or MemoryTickets(), **options)


async def get(url: str, headers: dict[str, str] | None = None) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(
        url, method="HEAD", headers=headers, raise_error=False, request_timeout=5
    )


# --- the verifier -----------------------------------------------------------------------------


async def test_hs256_claims_become_a_grant() -> None:
    verifier = JWTVerifier(key=SECRET)
    exp = int(time.time()) + 60
    grant = await verifier.verify(
        jwt.encode(
            {"sub": "bob", "exp": exp, "channels": ["a", "b:*"], "publish": ["b:out"]},
            SECRET,
            algorithm="HS256",
        )
    )
    assert grant == Grant(["a", "b:*"], subject="bob", publish=["b:out"], expires_at=exp)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_algorithms(algorithm: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    verifier = JWTVerifier(key=private.public_key(), algorithms=[algorithm])
    grant = await verifier.verify(token(private, algorithm))
    assert grant.subject == "alice"
    other: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    with pytest.raises(InvalidToken):
        await verifier.verify(token(other, algorithm))
    # An HS256 token signed with the public key's PEM is refused (algorithm confusion).
    with pytest.raises(InvalidToken):
        await verifier.verify(token("not-the-key-but-long-enough-for-hs256!", "HS256"))


BAD_TOKENS = {
    "wrong secret": lambda: token("another-secret-that-is-long-enough!!"),
    "expired": lambda: token(ttl=-10),
    "no channels": lambda: jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    ),
    "no exp": lambda: jwt.encode({"sub": "a", "channels": ["x"]}, SECRET, algorithm="HS256"),
    "channels not a list": lambda: token(channels="room:*"),  # type: ignore[arg-type]
    "alg none": lambda: jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60, "channels": ["x"]}, None, algorithm="none"
    ),
    "not yet valid": lambda: token(nbf=int(time.time()) + 60),
    "garbage": lambda: "not.a.token",
    "empty": lambda: "",
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_are_invalid(name: str) -> None:
    with pytest.raises(InvalidToken):
        await JWTVerifier(key=SECRET).verify(BAD_TOKENS[name]())


async def test_audience_issuer_and_leeway() -> None:
    verifier = JWTVerifier(key=SECRET, audience="events", issuer="https://id.example", leeway=30)
    good = token(aud="events", iss="https://id.example", ttl=-10)  # expired 10 s ago: leeway
    grant = await verifier.verify(good)
    assert grant.expires_at is not None and grant.expires_at > time.time()
    for bad in (
        token(aud="other", iss="https://id.example"),
        token(aud="events", iss="https://evil.example"),
        token(iss="https://id.example"),
        token(aud="events", iss="https://id.example", ttl=-60),
    ):
        with pytest.raises(InvalidToken):
            await verifier.verify(bad)


def test_verifier_refuses_unsafe_configurations() -> None:
    with pytest.raises(ValueError, match="confusion"):
        JWTVerifier(key=SECRET, algorithms=["HS256", "RS256"])
    with pytest.raises(ValueError, match="among"):
        JWTVerifier(key=SECRET, algorithms=["none"])
    with pytest.raises(ValueError, match="32 bytes"):
        JWTVerifier(key="short")
    assert JWTVerifier(key="short", weak_key=True).weak_key
    with pytest.raises(ValueError, match="one of them"):
        JWTVerifier()
    with pytest.raises(ValueError, match="public-key"):
        JWTVerifier(jwks_url="http://127.0.0.1:1/jwks", algorithms=["HS256"])


class JWKS(RequestHandler):
    def initialize(self, keys: dict[str, Any]) -> None:
        self.keys = keys

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.keys))


async def test_jwks_url() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    async with serve(Application([(r"/jwks", JWKS, {"keys": {"keys": [jwk]}})])) as server:
        verifier = JWTVerifier(jwks_url=server.url + "/jwks", algorithms=["ES256"])
        signed = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60, "channels": ["x"]},
            private,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        assert (await verifier.verify(signed)).subject == "a"
        unknown_kid = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60, "channels": ["x"]},
            private,
            algorithm="ES256",
            headers={"kid": "k2"},
        )
        with pytest.raises(InvalidToken):
            await verifier.verify(unknown_kid)


async def test_a_jwks_that_cannot_be_read_answers_503() -> None:
    verifier = JWTVerifier(jwks_url=f"http://127.0.0.1:{free_port()}/jwks", algorithms=["ES256"])
    events = Events(StreamAuth(jwt=verifier))
    async with serve([events.route(r"/events")], events) as server:
        headers = {"Authorization": f"Bearer {token()}"}
        assert (await get(server.url + "/events?channel=room:1", headers)).code == 503


def test_the_package_imports_without_pyjwt() -> None:
    program = """
import sys
sys.modules["jwt"] = None  # as if PyJWT were not installed
import sse_handler, sse_handler.auth
from sse_handler.auth import StreamAuth, MemoryTickets, JWTVerifier
StreamAuth(tickets=MemoryTickets())
try:
    JWTVerifier(key="k" * 32)
except ImportError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'sse_handler[jwt]'" in done.stdout


# --- tokens on a stream -----------------------------------------------------------------------


async def test_where_a_token_may_come_from() -> None:
    events = Events(kit(cookie="sse_token", query="token"))
    async with serve([events.route(r"/events")], events) as server:
        url = server.url + "/events?channel=room:1"
        good = token()
        assert (await get(url)).code == 401
        assert (await get(url, {"Authorization": f"Bearer {good}"})).code == 200
        assert (await get(url, {"Authorization": f"bearer {good}"})).code == 200
        assert (await get(url, {"Cookie": f"sse_token={good}"})).code == 200
        assert (await get(url + f"&token={good}")).code == 200
        assert (await get(url, {"Authorization": f"Bearer {token(ttl=-10)}"})).code == 401
        assert (await get(url, {"Authorization": "Bearer x.y.z"})).code == 401
        assert (await get(url, {"Authorization": f"Basic {good}"})).code == 401
        assert (await get(url, {"Cookie": "sse_token=%%%"})).code == 401
        outside = server.url + "/events?channel=news"
        assert (await get(outside, {"Authorization": f"Bearer {good}"})).code == 403


async def test_a_query_token_is_off_unless_named() -> None:
    events = Events(kit())
    async with serve([events.route(r"/events")], events) as server:
        url = server.url + f"/events?channel=room:1&token={token()}"
        assert (await get(url)).code == 401


async def test_a_cookie_from_another_origin_gets_403() -> None:
    events = Events(kit(cookie="sse_token"), cors_origins=["https://app.example"])
    async with serve([events.route(r"/events")], events) as server:
        url = server.url + "/events?channel=room:1"
        cookie = {"Cookie": f"sse_token={token()}"}
        own = {"Origin": server.url}
        assert (await get(url, {**cookie, **own})).code == 200
        assert (await get(url, {**cookie, "Origin": "https://app.example"})).code == 200
        assert (await get(url, {**cookie, "Origin": "https://evil.example"})).code == 403
        assert (await get(url, {**cookie, "Origin": "null"})).code == 403
        assert (await get(url, {**cookie, "Sec-Fetch-Site": "cross-site"})).code == 403
        assert (await get(url, {**cookie, "Sec-Fetch-Site": "same-origin"})).code == 200
        # A bearer token is not sent by a browser on its own: no origin check.
        bearer = {"Authorization": f"Bearer {token()}", "Origin": "https://evil.example"}
        assert (await get(url, bearer)).code == 200


async def test_a_stream_knows_its_subject_and_ends_when_its_token_expires() -> None:
    events = Events(kit(), reconnect_retry=(500, 500))
    async with serve([events.route(r"/events")], events) as server:
        headers = {"Authorization": f"Bearer {token(ttl=2, sub='carol')}"}
        client = await server.stream("/events?channel=room:1", headers)
        async with client:
            assert (await client.next_event()).data == '{"subject":"carol"}'
            [farewell] = await client.wait_closed(timeout=6)
            assert farewell.event == "auth_expired"
            assert client.parser.retry == 500


async def test_expire_streams_false_lets_a_stream_outlive_its_token() -> None:
    events = Events(kit(expire_streams=False))
    async with serve([events.route(r"/events")], events) as server:
        headers = {"Authorization": f"Bearer {token(ttl=60)}"}
        client = await server.stream("/events?channel=room:1", headers)
        async with client:
            await client.next_event()
            [conn] = events.connections()
            assert conn.auth_expires_at is None


# --- tickets ----------------------------------------------------------------------------------


async def test_a_ticket_works_once_for_its_channels() -> None:
    auth = kit()
    events = Events(auth)
    async with serve([events.route(r"/events")], events) as server:
        ticket = await auth.issue_ticket("dave", ["room:1", "news"])
        outside = await auth.issue_ticket("dave", ["room:1"])
        assert (await get(server.url + f"/events?channel=news&ticket={outside}")).code == 403
        client = await server.stream(f"/events?channel=room:1&channel=news&ticket={ticket}")
        async with client:
            assert client.status == 200
            assert (await client.next_event()).data == '{"subject":"dave"}'
            [conn] = events.connections()
            assert conn.subject == "dave"
            assert conn.channels == {"room:1", "news"}
            assert (await get(server.url + f"/events?channel=news&ticket={ticket}")).code == 401
        forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
        assert (await get(server.url + f"/events?ticket={forged}")).code == 401
        assert (await get(server.url + "/events?ticket=")).code == 401
        assert (await get(server.url + "/events?ticket=" + "x" * 1000)).code == 401


async def opened(server: Any, query: str) -> int:
    """The status of a GET of the stream (which a ticket is spent on), then closed."""
    client = await server.stream(query)
    async with client:
        status: int = client.status
        return status


async def head(url: str) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(url, method="HEAD", raise_error=False)


async def test_a_head_checks_a_ticket_without_spending_it() -> None:
    # A HEAD opens nothing, so it must not use up the one stream a ticket is for.
    auth = kit()
    events = Events(auth)
    async with serve([events.route(r"/events")], events) as server:
        ticket = await auth.issue_ticket("dora", ["room:1"])
        query = f"/events?channel=room:1&ticket={ticket}"
        assert (await head(server.url + query)).code == 200
        assert (await head(server.url + f"/events?channel=news&ticket={ticket}")).code == 403
        assert (await head(server.url + "/events?channel=room:1&ticket=nosuch")).code == 401
        client = await server.stream(query)
        async with client:
            assert client.status == 200
            assert (await client.next_event()).data == '{"subject":"dora"}'
        assert (await head(server.url + query)).code == 401  # spent by the GET


async def test_an_expired_ticket_gets_401() -> None:
    auth = kit()
    events = Events(auth)
    async with serve([events.route(r"/events")], events) as server:
        ticket = await auth.issue_ticket("erin", ["room:1"], ttl=0.2)
        await asyncio.sleep(0.3)  # the ticket's lifetime, deliberately
        assert (await get(server.url + f"/events?channel=room:1&ticket={ticket}")).code == 401


async def test_a_ticket_carries_the_expiry_of_its_credential() -> None:
    auth = kit()
    events = Events(auth)
    async with serve([events.route(r"/events")], events) as server:
        ticket = await auth.issue_ticket("f", ["room:1"], expires_at=time.time() + 0.5)
        client = await server.stream(f"/events?channel=room:1&ticket={ticket}")
        async with client:
            names = [event.event for event in await client.wait_closed(timeout=5)]
            assert names == ["welcome", "auth_expired"]


async def test_ticket_lifetimes_are_bounded() -> None:
    auth = kit()
    for ttl in (0, -1, 301):
        with pytest.raises(ValueError, match="ttl"):
            await auth.issue_ticket("a", ["x"], ttl=ttl)
    with pytest.raises(RuntimeError, match="ticket store"):
        await StreamAuth().issue_ticket("a", ["x"])


async def test_memory_tickets_forget_the_unspent() -> None:
    store = MemoryTickets()
    await store.put("a", b"1", 0.05)
    await asyncio.sleep(1.1)  # past the ticket's life and the once-a-second sweep, deliberately
    await store.put("b", b"2", 30)
    assert len(store) == 1


async def redis_keys(url: str) -> list[bytes]:
    from redis import asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return [key async for key in client.scan_iter("app:ticket:*")]
    finally:
        await client.aclose()


def broker_tickets(server: RedisServer) -> tuple[RedisBroker, TicketStore]:
    broker = RedisBroker(server.url, prefix="app:")
    return broker, tickets_for(broker)


async def test_redis_tickets_are_shared_and_taken_once(redis_server: RedisServer) -> None:
    broker_a, store_a = broker_tickets(redis_server)
    broker_b, store_b = broker_tickets(redis_server)
    assert isinstance(store_a, RedisTickets) and store_a.prefix == "app:ticket:"
    a, b = Events(kit(store_a), broker=broker_a), Events(kit(store_b), broker=broker_b)
    try:
        async with (
            serve([a.route(r"/events")], a) as server_a,
            serve([b.route(r"/events")], b) as server_b,
        ):
            ticket = await a.auth.issue_ticket("gus", ["room:*"])
            assert len(ticket) >= 43  # 32 random bytes
            keys = await redis_keys(redis_server.url)
            assert len(keys) == 1 and keys[0].startswith(b"app:ticket:")
            assert ticket.encode() not in keys[0]
            query = f"/events?channel=room:9&ticket={ticket}"
            client = await server_b.stream(query)
            async with client:
                assert (await client.next_event()).data == '{"subject":"gus"}'
            assert (await get(server_a.url + query)).code == 401
            assert (await get(server_b.url + query)).code == 401
            # Raced by both processes at once: exactly one stream.
            ticket = await b.auth.issue_ticket("gus", ["room:*"])
            query = f"/events?channel=room:9&ticket={ticket}"
            codes = await asyncio.gather(*(opened(s, query) for s in (server_a, server_b) * 4))
            assert sorted(codes) == [200] + [401] * 7
    finally:
        for store in (store_a, store_b):
            await store.close()
        for broker in (broker_a, broker_b):
            await broker.close()


async def test_a_head_does_not_spend_a_redis_ticket(redis_server: RedisServer) -> None:
    broker, store = broker_tickets(redis_server)
    events = Events(kit(store), broker=broker)
    try:
        async with serve([events.route(r"/events")], events) as server:
            ticket = await events.auth.issue_ticket("ida", ["room:1"])
            query = f"/events?channel=room:1&ticket={ticket}"
            assert (await head(server.url + query)).code == 200
            assert await opened(server, query) == 200
            assert (await head(server.url + query)).code == 401  # spent by the GET
    finally:
        await store.close()
        await broker.close()


async def test_a_ticket_store_that_is_down_answers_503(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisTickets(redis_server.url)
    events = Events(kit(store))
    try:
        async with serve([events.route(r"/events")], events) as server:
            ticket = await events.auth.issue_ticket("h", ["room:1"])
            redis_server.kill()
            assert (await get(server.url + f"/events?channel=room:1&ticket={ticket}")).code == 503
    finally:
        await store.close()
    assert "Traceback" not in caplog.text


def test_tickets_for_a_memory_broker_are_in_memory() -> None:
    assert isinstance(tickets_for(ServerSentEventHandler().broker), MemoryTickets)


async def test_authorize_keeps_working_for_applications_with_their_own_auth() -> None:
    class Own(ServerSentEventHandler):
        def authorize(self, request: HTTPServerRequest) -> Collection[str]:
            return ["mine"]

    own = Own()
    async with serve([own.route(r"/events")], own) as server:
        client = await server.stream("/events?channel=other")
        async with client:
            assert client.status == 200
            await asyncio.sleep(0)
    assert own.stats().opened == 1
