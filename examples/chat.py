"""Chat rooms: channels, POST to publish, Last-Event-ID resume, a small page.

``GET /`` a page; ``GET /rooms/<room>/events`` the room's stream (a channel);
``POST /rooms/<room>/messages`` with a form field ``text`` (and ``name``)
publishes to it and answers the message id. A browser that loses its
connection resumes by itself with Last-Event-ID and misses nothing.

Run ``python examples/chat.py --port 8888`` and open http://127.0.0.1:8888/.
"""

from __future__ import annotations

import argparse
import asyncio

import tornado.web

from sse_handler import ServerSentEventHandler

PAGE = """<!doctype html>
<meta charset="utf-8"><title>sse_handler chat</title>
<h1>Room <span id="room"></span></h1>
<ul id="log"></ul>
<form id="say"><input id="name" value="guest" size="8">
<input id="text" autofocus placeholder="message"><button>Send</button></form>
<script>
const room = location.hash.slice(1) || "lobby";
document.getElementById("room").textContent = room;
const log = document.getElementById("log");
const es = new EventSource(`/rooms/${room}/events`);
es.addEventListener("chat", (e) => {
  const m = JSON.parse(e.data);
  const li = document.createElement("li");
  li.textContent = `${m.name}: ${m.text}`;
  log.appendChild(li);
});
es.addEventListener("reset", () => location.reload());
document.getElementById("say").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = new URLSearchParams({
    name: document.getElementById("name").value,
    text: document.getElementById("text").value,
  });
  await fetch(`/rooms/${room}/messages`, {method: "POST", body});
  document.getElementById("text").value = "";
});
</script>
"""

ROOM = r"(?P<channel>[A-Za-z0-9_-]{1,32})"


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(PAGE)


class Messages(tornado.web.RequestHandler):
    def initialize(self, rooms: ServerSentEventHandler) -> None:
        self.rooms = rooms

    async def post(self, channel: str) -> None:
        text = self.get_body_argument("text", "").strip()
        if not text:
            raise tornado.web.HTTPError(400, "text is empty")
        name = self.get_body_argument("name", "guest")[:32]
        message_id = await self.rooms.publish(
            channel, event="chat", data={"name": name, "text": text}
        )
        self.write({"id": message_id})


def make_app() -> tornado.web.Application:
    rooms = ServerSentEventHandler()
    return tornado.web.Application(
        [
            (r"/", Page),
            rooms.route(rf"/rooms/{ROOM}/events"),
            (rf"/rooms/{ROOM}/messages", Messages, {"rooms": rooms}),
        ]
    )


async def main(port: int) -> None:
    make_app().listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    asyncio.run(main(parser.parse_args().port))
