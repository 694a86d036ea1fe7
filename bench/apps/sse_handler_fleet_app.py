"""sse_handler's demo for the fleet scenarios (issue 15): a short keep-alive, a
broadcast route, and the housekeeping timer's callbacks timed.

``python sse_handler_fleet_app.py --port P --keepalive SECONDS``, run in the
directory that holds the bench's copy of ``sse_handler/`` (as ``python -m
sse_handler demo`` is). It is the demo, its routes and its serving code
(:func:`sse_handler.demo.app.serve`: listen backlog, collector settings,
shutdown), with three bench-only changes on the handler that
:func:`~sse_handler.demo.app.make_app` builds:

- ``keepalive`` is ``--keepalive`` (the demo keeps the library's 15 s): the
  housekeeping timer then walks the connections every ``keepalive / 2``
  seconds, often enough to be seen in a 10 s window;
- ``POST /send_all``: the body (UTF-8) becomes the data of one event sent with
  ``handler.send_all()`` to every stream of ``/events``, whatever its channel;
  answers ``{"delivered_to": N}``;
- ``GET /bench/sweep``: the handler's housekeeping callbacks so far, each timed
  with ``time.perf_counter()``: ``{"callbacks", "seconds", "max_seconds",
  "p99_seconds", "period"}``, the longest callback and the p99 of their
  durations since the previous request.

The library is not changed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import tornado.web


class SweepClock:
    """Times each call of the housekeeping callback it wraps."""

    def __init__(self, tick: Callable[[], None], period: Callable[[], float]) -> None:
        self._tick = tick
        self._period = period
        self.callbacks = 0
        self.seconds = 0.0
        self.durations: list[float] = []  # since the last figures()

    def __call__(self) -> None:
        start = time.perf_counter()
        try:
            self._tick()
        finally:
            took = time.perf_counter() - start
            self.callbacks += 1
            self.seconds += took
            self.durations.append(took)

    def figures(self) -> dict[str, float]:
        """The counts so far; the longest callback and the p99 of their
        durations since the previous call."""
        durations = sorted(self.durations)
        self.durations = []
        p99 = durations[max(0, math.ceil(0.99 * len(durations)) - 1)] if durations else 0.0
        return {
            "callbacks": self.callbacks,
            "seconds": self.seconds,
            "max_seconds": durations[-1] if durations else 0.0,
            "p99_seconds": p99,
            "period": self._period(),
        }


class SendAllHandler(tornado.web.RequestHandler):
    def initialize(self, sse_handler: Any) -> None:
        self.sse_handler = sse_handler

    def post(self) -> None:
        delivered = self.sse_handler.send_all(data=self.request.body.decode("utf-8"))
        self.finish({"delivered_to": delivered})


class SweepHandler(tornado.web.RequestHandler):
    def initialize(self, clock: SweepClock) -> None:
        self.clock = clock

    def get(self) -> None:
        self.finish(self.clock.figures())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keepalive", type=float, required=True)
    args = parser.parse_args()
    # A script's own directory comes first on sys.path; the bench serves
    # sse_handler from its copy in the current directory, as `python -m` would.
    sys.path.insert(0, os.getcwd())
    from sse_handler.demo import app as demo

    make_app = demo.make_app

    def make_fleet_app(*a: Any, **kw: Any) -> Any:
        app, handler = make_app(*a, **kw)
        handler.keepalive = args.keepalive
        # The timer is scheduled with the bound method looked up on the
        # instance: this attribute shadows the class's.
        clock = SweepClock(handler._housekeeping_tick, handler._housekeeping_period)
        handler._housekeeping_tick = clock  # type: ignore[method-assign]
        app.wildcard_router.add_rules(
            [
                (r"/send_all", SendAllHandler, {"sse_handler": handler}),
                (r"/bench/sweep", SweepHandler, {"clock": clock}),
            ]
        )
        return app, handler

    # serve() builds its app through the module's make_app: it gets this one.
    demo.make_app = make_fleet_app
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("bench").info(
        "sse_handler from %s: keepalive=%g s", os.path.dirname(demo.__file__), args.keepalive
    )
    asyncio.run(demo.serve(args.host, args.port))


if __name__ == "__main__":
    main()
