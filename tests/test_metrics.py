"""Prometheus metrics read from the handler's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import serve, wait_until
from tornado.httpclient import AsyncHTTPClient

from sse_handler import CloseReason, MemoryBroker, ServerSentEventHandler
from sse_handler.demo.app import make_app
from sse_handler.metrics import metrics_route, register_cluster_metrics, register_metrics


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "endpoint"))
            values[(sample.name, labels)] = sample.value
    return values


async def test_counters_follow_connections_events_and_replays() -> None:
    registry = CollectorRegistry()
    handler = ServerSentEventHandler(broker=MemoryBroker(history_size=2))
    register_metrics(handler, "events", registry)
    async with serve([handler.route("/events")], handler) as server:
        a, b = await server.stream(), await server.stream()
        await wait_until(lambda: len(handler) == 2)
        ids = [await handler.publish("default", data=str(i)) for i in range(5)]
        await a.events(5)
        await b.events(5)
        values = scrape(registry)
        assert values[("sse_connections_open", ())] == 2
        assert values[("sse_connections_opened_total", ())] == 2
        assert values[("sse_events_sent_total", ())] == 10
        assert values[("sse_bytes_sent_total", ())] > 10 * len(b"data: 0\n\n")
        assert values[("sse_queue_depth_bucket", (("le", "0"),))] == 2
        handler.stop_one(handler.connection_ids()[0])
        await a.wait_closed()
        # A replay from an id that is still in history, and one that is not.
        ok = await server.stream(headers={"Last-Event-ID": ids[3]})
        old = await server.stream(headers={"Last-Event-ID": ids[0]})
        assert (await ok.next_event()).data == "4"
        assert (await old.next_event()).event == "reset"
        values = scrape(registry)
        assert values[("sse_connections_closed_total", (("reason", CloseReason.STOPPED),))] == 1
        # Events of the closed connection still count.
        assert values[("sse_events_sent_total", ())] == 12
        assert values[("sse_replay_requests_total", ())] == 2
        assert values[("sse_replay_resets_total", (("reason", "history_exceeded"),))] == 1
        assert values[("sse_dropped_total", (("policy", "disconnect"),))] == 0
        for client in (b, ok, old):
            client.close()


async def test_metrics_route_and_demo_exposes_metrics() -> None:
    registry = CollectorRegistry()
    handler = ServerSentEventHandler()
    register_metrics(handler, "events", registry)
    async with serve(
        [handler.route("/events"), metrics_route("/metrics", registry)], handler
    ) as s:
        http = AsyncHTTPClient()
        response = await http.fetch(s.url + "/metrics")
        assert response.headers["Content-Type"].startswith("text/plain")
        assert b'sse_connections_open{endpoint="events"} 0.0' in response.body
    app, demo = make_app()
    async with serve(app, demo) as s:
        client = await s.stream()
        await client.next_event()
        response = await http.fetch(s.url + "/metrics")
        assert b'sse_connections_open{endpoint="events"} 1.0' in response.body
        client.close()


async def test_cluster_metrics_count_presence_and_operations_without_channel_labels() -> None:
    registry = CollectorRegistry()
    handler = ServerSentEventHandler()
    assert handler.cluster is not None
    register_cluster_metrics(handler.cluster, registry)
    async with serve([handler.route("/events")], handler) as server:
        clients = [
            await server.stream("/events?channel=a&channel=b"),
            await server.stream("/events?channel=a"),
        ]
        await wait_until(lambda: len(handler) == 2)
        await handler.cluster.connections()
        assert await handler.cluster.stop_one("nosuchcid") is False
        await handler.cluster.presence("a")
        values = scrape(registry)
        assert values[("sse_presence_entries", ())] == 3
        assert values[("sse_cluster_operations_total", (("operation", "list"),))] == 1
        assert values[("sse_cluster_operations_total", (("operation", "stop"),))] == 1
        assert values[("sse_cluster_operations_total", (("operation", "presence"),))] == 1
        assert values[("sse_cluster_unanswered_total", ())] == 0
        labels = {name for _, pairs in values for name, _ in pairs}
        assert labels == {"operation"}  # no channel, no subject
        for client in clients:
            client.close()
        await wait_until(lambda: len(handler) == 0)
        assert scrape(registry)[("sse_presence_entries", ())] == 0
