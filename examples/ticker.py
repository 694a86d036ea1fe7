"""A connection whose source is an async queue of prices, not ``send()``.

A market task produces prices; each connection subscribes its own
``asyncio.Queue``. ``poll_data()`` awaits the next price and
``poll_data_immediate()`` takes the ones already waiting, so a burst leaves
in one write. The I/O task paces each client's source by that client: a slow
reader backs up its own queue, never the market or the other clients.

Run ``python examples/ticker.py --port 8888`` and
``curl -N 'localhost:8888/prices?symbol=ACME'``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

import tornado.web

from sse_handler import (
    CloseReason,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.connection import Sendable

Tick = tuple[int, str, float]


class Market:
    """Random-walk prices for a few symbols, fanned out to per-client queues."""

    def __init__(self, symbols: list[str], interval: float) -> None:
        self.prices = dict.fromkeys(symbols, 100.0)
        self.interval = interval
        self.listeners: dict[str, set[asyncio.Queue[Tick]]] = {s: set() for s in symbols}
        self.n = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for symbol, price in self.prices.items():
                self.n += 1
                price = self.prices[symbol] = round(price * random.uniform(0.99, 1.01), 2)
                for queue in self.listeners[symbol]:
                    if queue.full():
                        queue.get_nowait()  # a stale price is worth nothing: drop it
                    queue.put_nowait((self.n, symbol, price))


class TickerConnection(ServerSentEventConnection):
    market: Market

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        asked = self.query_arguments.get("symbol", [b"ACME"])[0].decode("ascii", "replace")
        self.symbol = asked if asked in self.market.listeners else "ACME"
        self.ticks: asyncio.Queue[Tick] = asyncio.Queue(maxsize=100)

    def registered(self) -> None:
        self.market.listeners[self.symbol].add(self.ticks)
        self.send(event="hello", data={"symbol": self.symbol})

    def connection_closed(self, reason: CloseReason) -> None:
        self.market.listeners[self.symbol].discard(self.ticks)

    @staticmethod
    def event(tick: Tick) -> ServerSentEvent:
        n, symbol, price = tick
        return ServerSentEvent(data={"symbol": symbol, "price": price}, event="tick", id=str(n))

    async def poll_data(self) -> Sendable | None:
        return self.event(await self.ticks.get())

    def poll_data_immediate(self) -> list[Sendable]:
        ready: list[Sendable] = []
        while not self.ticks.empty():
            ready.append(self.event(self.ticks.get_nowait()))
        return ready


class Prices(ServerSentEventHandler):
    connection_class = TickerConnection


async def main(port: int, interval: float) -> None:
    market = Market(["ACME", "INITECH", "UMBRELLA"], interval)
    TickerConnection.market = market
    handler = Prices()
    app = tornado.web.Application([handler.route(r"/prices")])
    app.listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/prices", flush=True)
    await market.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.interval))
