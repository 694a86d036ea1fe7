"""docs/clients.md's table is the one the last real run of the clients produced.

``tests/clients/results.json`` is written by ``tox -e clients`` (the harness
runs each client library against a real server; ``SSE_CLIENTS_UPDATE=1``);
here, without network or npm, the page's table must be exactly its rendering,
so that no cell of the page is written by hand.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

CLIENTS = Path(__file__).resolve().parent / "clients"


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clients_harness", CLIENTS / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = load_harness()


def test_the_page_table_is_the_recorded_run() -> None:
    results = json.loads(harness.RESULTS.read_text())
    page = harness.table_in_page(harness.PAGE.read_text())
    assert page == harness.render_table(results), (
        "docs/clients.md's table differs from tests/clients/results.json; regenerate it "
        "with SSE_CLIENTS_UPDATE=1 tox -e clients"
    )


def test_the_recorded_run_covers_every_client_and_scenario() -> None:
    results = json.loads(harness.RESULTS.read_text())
    assert [s["name"] for s in results["scenarios"]] == [s.name for s in harness.SCENARIOS]
    assert [c["driver"] for c in results["clients"]] == [c.driver for c in harness.CLIENTS]
    for client in results["clients"]:
        assert client["version"], client["name"]
        assert "not run" not in client["results"].values(), client["name"]
