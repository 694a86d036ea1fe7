"""The ticket recipe of docs/authentication.md, with the JWT in a cookie.

``/login`` stands in for the application's own sign-in: it sets ``sse_token``,
a short-lived JWT (HttpOnly, SameSite=Strict). The page at ``/`` trades that
cookie for a single-use ticket at ``POST /tickets`` (same origin: the cookie
goes along, and ``StreamAuth`` checks the request's origin), opens
``/events?ticket=...``, and on ``event: auth_expired`` signs in again, takes a
new ticket and resumes from its last event id (``&last_event_id=``), so no
event is lost. ``POST /publish?channel=NAME`` takes a bearer token whose
``publish`` claim covers the channel.

Run ``python examples/stream_auth.py --port 8888 --secret "$(python -c 'import
secrets; print(secrets.token_urlsafe(32))')"`` and open http://127.0.0.1:8888/.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import jwt
import tornado.web
from tornado.httputil import HTTPServerRequest

from sse_handler import Grant, ServerSentEventHandler
from sse_handler.auth import JWTVerifier, MemoryTickets, StreamAuth

PAGE = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stream auth</title></head>
<body><p>received: <span id="count">0</span>, renewals: <span id="renewals">0</span></p>
<script>
"use strict";
window.received = [];
window.renewals = 0;
let lastId = "";
async function openStream() {
  let answer = await fetch("/tickets?channel=room:1", {method: "POST"});
  if (answer.status === 401) {  // no cookie yet, or it expired: sign in again
    await fetch("/login", {method: "POST"});
    answer = await fetch("/tickets?channel=room:1", {method: "POST"});
  }
  const {ticket} = await answer.json();
  let url = "/events?channel=room:1&ticket=" + encodeURIComponent(ticket);
  if (lastId) url += "&last_event_id=" + encodeURIComponent(lastId);
  const source = new EventSource(url);
  source.onopen = () => { window.opened = (window.opened || 0) + 1; };
  source.onmessage = (e) => {
    lastId = e.lastEventId;
    window.received.push(e.data);
    document.getElementById("count").textContent = window.received.length;
  };
  source.addEventListener("auth_expired", async () => {
    source.close();  // the ticket is spent: a reconnect of this EventSource would get 401
    window.renewals += 1;
    document.getElementById("renewals").textContent = window.renewals;
    await fetch("/login", {method: "POST"});
    openStream();
  });
}
openStream();
</script></body></html>
"""


class Events(ServerSentEventHandler):
    def __init__(self, auth: StreamAuth) -> None:
        super().__init__()
        self.auth = auth

    async def authorize(self, request: HTTPServerRequest) -> Grant:
        return await self.auth.authorize(request, self.cors)


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE)


class Login(tornado.web.RequestHandler):
    """The application's sign-in, reduced to one user: a fresh token in a cookie."""

    def initialize(self, secret: str, ttl: float) -> None:
        self.secret = secret
        self.ttl = ttl

    def post(self) -> None:
        claims = {"sub": "demo-user", "exp": int(time.time() + self.ttl), "channels": ["room:*"]}
        token = jwt.encode(claims, self.secret, algorithm="HS256")
        self.set_cookie("sse_token", token, httponly=True, samesite="Strict")
        self.set_status(204)


class Tickets(tornado.web.RequestHandler):
    def initialize(self, events: Events) -> None:
        self.events = events

    async def post(self) -> None:
        auth = self.events.auth
        grant = await auth.authenticate(self.request, self.events.cors)  # 401 / 403
        asked = self.get_query_arguments("channel")
        if not all(grant.may_read(channel) for channel in asked):
            raise tornado.web.HTTPError(403)
        ticket = await auth.issue_ticket(grant.subject, asked, expires_at=grant.expires_at)
        self.set_header("Cache-Control", "no-store")
        self.finish({"ticket": ticket, "expires_in": auth.ticket_ttl})


class Publish(tornado.web.RequestHandler):
    def initialize(self, events: Events) -> None:
        self.events = events

    async def post(self) -> None:
        grant = await self.events.auth.authenticate(self.request, self.events.cors)
        channel = self.get_query_argument("channel")
        if not grant.may_publish(channel):
            raise tornado.web.HTTPError(403)
        event_id = await self.events.publish(channel, data=self.request.body.decode())
        self.finish({"id": event_id})


async def main(port: int, secret: str, token_ttl: float) -> None:
    # One process: tickets in memory (tickets_for(RedisBroker(...)) shares them).
    auth = StreamAuth(jwt=JWTVerifier(key=secret), tickets=MemoryTickets(), cookie="sse_token")
    events = Events(auth)
    app = tornado.web.Application(
        [
            (r"/", Page),
            (r"/login", Login, {"secret": secret, "ttl": token_ttl}),
            (r"/tickets", Tickets, {"events": events}),
            (r"/publish", Publish, {"events": events}),
            events.route(r"/events"),
        ]
    )
    app.listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--secret", required=True, help="the HS256 secret (32 bytes or more)")
    parser.add_argument("--token-ttl", type=float, default=600.0, help="seconds a login lasts")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.secret, args.token_ttl))
