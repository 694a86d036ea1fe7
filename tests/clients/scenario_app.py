"""The server the clients are run against: one sse_handler endpoint per scenario.

``python tests/clients/scenario_app.py --port P`` serves, on 127.0.0.1 only:

``GET /s/<scenario>?run=<token>``
    The scenario's stream (see :data:`SCENARIOS` in ``harness.py`` for what each
    sends and what a client should make of it).
``GET /log/<token>``
    The requests the server saw for that run, as JSON: the ``Last-Event-ID`` of
    each (``null`` for none) and the status answered.
``GET /blank``
    An empty page, so that the browser's ``EventSource`` is same-origin.

Every stream is HTTP/1.1 with chunked transfer coding, starts with the ``: ok``
comment line (no blank line after it) as every sse_handler stream does, and ends
with ``event: end`` when the scenario has one, after which the client closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import defaultdict
from typing import Any

import tornado.web
from tornado.httputil import HTTPServerRequest

from sse_handler import ServerSentEventConnection, ServerSentEventHandler
from sse_handler.server import make_server

#: A 100 KiB and a 600 KiB single data line (a pattern, so that a cut shows).
LINE_100K = ("0123456789abcdef" * 64 * 100)[: 100 * 1024]
LINE_600K = ("0123456789abcdef" * 64 * 600)[: 600 * 1024]
MULTILINE = "first line\nsecond line\n\nfourth line"
#: Seconds without an event in the quiet scenarios (more than httpx's 5 s read timeout).
QUIET = 7.0

#: run token -> the requests seen: {"last_event_id": ..., "status": ...}
LOG: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)


def run_of(query: dict[str, list[bytes]]) -> str:
    values = query.get("run") or [b"-"]
    return values[-1].decode()


class Scenario(ServerSentEventConnection):
    """Sends what the scenario named by its handler's ``name`` sends."""

    def registered(self) -> None:
        name = self.handler.name  # type: ignore[attr-defined]
        LOG[run_of(self.query_arguments)].append(
            {"last_event_id": self.last_event_id, "status": 200}
        )
        if name == "welcome":
            self.send(event="welcome", data={"connection_id": self.cid})
            self.send(event="end", data="")
        elif name == "multiline":
            self.send(event="multi", data=MULTILINE)
            self.send(event="end", data="")
        elif name == "id-only":
            if self.last_event_id is None:
                self.send(id="7")  # id: 7 and a blank line: no data, nothing to dispatch
                self.send(event="after", data="x")
                self.stop(retry=250)  # it should come back with Last-Event-ID: 7
            else:
                self.send(event="end", data=self.last_event_id)
        elif name == "line-100k":
            self.send(event="big", data=LINE_100K)
            self.send(event="end", data="")
        elif name == "line-600k":
            self.send(event="big", data=LINE_600K)
            self.send(event="end", data="")
        elif name == "resume":
            if self.last_event_id is None:
                self.send(event="first", id="1", data="1")
                self.stop(retry=250)  # a clean close: the client should come back
            else:
                self.send(event="second", id="2", data=self.last_event_id)
                self.send(event="end", data="")
        elif name.startswith("quiet"):
            asyncio.get_running_loop().call_later(QUIET, self._late)
        else:
            raise AssertionError(name)

    def _late(self) -> None:
        if self.is_active:
            self.send(event="late", data="after the silence")
            self.send(event="end", data="")


class ScenarioHandler(ServerSentEventHandler):
    connection_class = Scenario

    def __init__(self, name: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.name = name

    def authorize(self, request: HTTPServerRequest) -> bool | None:
        if self.name == "stop-204":
            LOG[run_of(request.query_arguments)].append(
                {"last_event_id": request.headers.get("Last-Event-ID"), "status": 204}
            )
            raise tornado.web.HTTPError(204)  # "stop reconnecting"
        return None

    def replay_events_since(self, conn: ServerSentEventConnection, last_event_id: str) -> None:
        # The scenario answers the id itself (in registered()); no broker
        # history here, so no `event: reset` either.
        return None


#: scenario -> handler settings
HANDLERS: dict[str, dict[str, Any]] = {
    "welcome": {},
    "multiline": {},
    "id-only": {},
    "line-100k": {},
    "line-600k": {},
    "resume": {},
    "stop-204": {},
    "quiet-keepalive-15s": {"keepalive": 15},
    "quiet-keepalive-2s": {"keepalive": 2},
}


class LogHandler(tornado.web.RequestHandler):
    def get(self, token: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(LOG.get(token, [])))


class BlankHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write("<!doctype html><title>clients</title>")


def make_app() -> tornado.web.Application:
    routes: list[Any] = [
        ScenarioHandler(name, **settings).route(f"/s/{name}")
        for name, settings in HANDLERS.items()
    ]
    routes += [(r"/log/([^/]+)", LogHandler), (r"/blank", BlankHandler)]
    return tornado.web.Application(routes, log_function=lambda handler: None)


async def main(port: int) -> None:
    server = make_server(make_app())
    server.listen(port, address="127.0.0.1")
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
