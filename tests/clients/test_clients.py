"""``tox -e clients``: the clients of docs/clients.md, run for real; the page must agree.

Runs :mod:`harness` (every client against every scenario, a few minutes) and
compares each cell with ``results.json``, the table the page is rendered from
(``tests/test_clients_doc.py`` checks that part in the default suite). After a
deliberate change (a new client version, a new scenario) regenerate both with
``SSE_CLIENTS_UPDATE=1 tox -e clients`` and review the diff.
"""

from __future__ import annotations

import json
import os
import socket

import harness
from scenario_app import LINE_100K


def test_the_streams_are_chunked() -> None:
    """What the page says of transfer coding: every stream is HTTP/1.1 chunked."""
    server = harness.ScenarioServer()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /s/line-100k HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while b"event: end" not in received:
                chunk = sock.recv(65536)
                assert chunk, "stream ended early"
                received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        assert b"transfer-encoding: chunked" in head
        assert b"content-length" not in head
        assert LINE_100K[:64].encode() in received
    finally:
        server.stop()


def test_every_client_does_what_the_page_says() -> None:
    clients = [harness.Client(c.name, c.kind, c.driver, c.package) for c in harness.CLIENTS]
    harness.run(clients, progress=print)
    fresh = harness.to_json(clients)
    if os.environ.get("SSE_CLIENTS_UPDATE"):
        harness.RESULTS.write_text(json.dumps(fresh, indent=1, ensure_ascii=False) + "\n")
        harness.write_page(fresh)
        return
    recorded = json.loads(harness.RESULTS.read_text())
    cells = {(c["name"], s): c["results"][s] for c in recorded["clients"] for s in c["results"]}
    differ = [
        f"{c['name']} / {s}: page says {cells.get((c['name'], s))!r}, run gave {got!r}"
        for c in fresh["clients"]
        for s, got in c["results"].items()
        if cells.get((c["name"], s)) != got
    ]
    assert not differ, (
        "the clients do not do what docs/clients.md says (SSE_CLIENTS_UPDATE=1 tox -e "
        "clients rewrites it):\n" + "\n".join(differ)
    )
