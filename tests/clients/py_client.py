"""One PyPI client against one scenario stream; prints one JSON line.

``python py_client.py CLIENT URL TIMEOUT TYPES`` prints
``{"events": [{"type", "data", "id"}...], "end": "end-event" | "closed" | "error" |
"timeout", "error": "..."}``. Each client is used the way its README shows, with
its defaults (no timeout or retry setting of ours): what is recorded is what it
does out of the box. ``id`` is the client's last event id as it exposes it with
the event (``last_event_id`` where it has one, else the event's ``id``).

``sseclient`` (btubbs) and ``sseclient-py`` are both imported as ``sseclient``;
the harness installs the former into a directory of its own, passed in
``SSE_CLIENTS_SSECLIENT_DIR``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from typing import Any

_lock = threading.Lock()
_events: list[dict[str, Any]] = []
_done = False


def finish(end: str, error: BaseException | str | None = None) -> None:
    global _done
    with _lock:
        if _done:
            return
        _done = True
        out: dict[str, Any] = {"events": list(_events), "end": end}
        if error is not None:
            out["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    os._exit(0)  # whatever the client is blocked in


def record(type_: str | None, data: str, id_: str | None) -> bool:
    """Record an event; True once the scenario's ``end`` came."""
    with _lock:
        _events.append({"type": type_ or "message", "data": data, "id": id_})
    if type_ == "end":
        finish("end-event")
    return False


def sseclient_py(url: str) -> None:
    import requests
    import sseclient

    response = requests.get(url, stream=True, headers={"Accept": "text/event-stream"})
    for event in sseclient.SSEClient(response).events():
        record(event.event, event.data, event.id)


def sseclient_btubbs(url: str) -> None:
    sys.path.insert(0, os.environ["SSE_CLIENTS_SSECLIENT_DIR"])
    import sseclient

    assert not hasattr(sseclient.SSEClient, "events"), "got sseclient-py, not sseclient"
    for msg in sseclient.SSEClient(url):
        record(msg.event, msg.data, msg.id)


def requests_sse(url: str) -> None:
    from requests_sse import EventSource

    with EventSource(url) as source:
        for event in source:
            record(event.type, event.data, event.last_event_id)


def httpx_sse(url: str) -> None:
    import httpx
    from httpx_sse import connect_sse

    with httpx.Client() as client, connect_sse(client, "GET", url) as source:
        for event in source.iter_sse():
            record(event.event, event.data, event.id)


def launchdarkly(url: str) -> None:
    from ld_eventsource import SSEClient

    client = SSEClient(url)
    for event in client.events:
        record(event.event, event.data, event.last_event_id)


def launchdarkly_continue(url: str) -> None:
    """Reconnects after a clean close too (by default its iterator ends there)."""
    from ld_eventsource import SSEClient
    from ld_eventsource.config import ErrorStrategy

    client = SSEClient(url, error_strategy=ErrorStrategy.always_continue())
    for event in client.events:
        record(event.event, event.data, event.last_event_id)


def aiohttp_sse_client(url: str) -> None:
    from aiohttp_sse_client import client as sse_client

    async def read() -> None:
        async with sse_client.EventSource(url) as source:
            async for event in source:
                record(event.type, event.data, event.last_event_id)

    asyncio.run(read())


CLIENTS = {
    "sseclient-py": sseclient_py,
    "sseclient": sseclient_btubbs,
    "requests-sse": requests_sse,
    "httpx-sse": httpx_sse,
    "launchdarkly-eventsource": launchdarkly,
    "launchdarkly-continue": launchdarkly_continue,
    "aiohttp-sse-client": aiohttp_sse_client,
}


def main() -> None:
    client, url, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    threading.Timer(timeout, finish, ("timeout",)).start()
    try:
        CLIENTS[client](url)
    except BaseException as exc:
        finish("error", exc)
    finish("closed")


if __name__ == "__main__":
    main()
