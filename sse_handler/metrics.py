"""Prometheus metrics (extra ``sse_handler[metrics]``, prometheus-client).

::

    from sse_handler.metrics import register_metrics, metrics_route

    register_metrics(events, endpoint="events")           # once per handler
    app = Application([events.route("/events"), metrics_route("/metrics")])

Everything is read at scrape time from the handlers' counters
(:meth:`ServerSentEventHandler.stats`), so the write path pays nothing for it:

==============================================  =======================================
``sse_connections_open``                        gauge: connections open now
``sse_connections_opened_total``                counter
``sse_connections_closed_total{reason}``        counter, by :class:`CloseReason`
``sse_events_sent_total``                       counter: events accepted for sending
``sse_bytes_sent_total``                        counter: bytes the sockets took
``sse_dropped_total{policy}``                   counter: frames dropped by the overflow policy
``sse_queue_depth``                             gauge histogram of the live queue depths
``sse_replay_requests_total``                   counter: connections with a Last-Event-ID
``sse_replay_resets_total{reason}``             counter: ``event: reset`` sent, by reason
``sse_broker_reader_healthy``                   gauge: 1 while the broker's reader reads,
                                                0 from a failed read until one succeeds
``sse_broker_reader_restarts_total``            counter: reader restarts after an
                                                unexpected error
``sse_broker_malformed_entries_total``          counter: stream entries skipped because
                                                sse_handler did not write them
==============================================  =======================================

The ``sse_broker_*`` metrics are there when the handler's broker has a reader
that reports on itself (:class:`~sse_handler.brokers.redis.RedisBroker`).
Every metric has an ``endpoint`` label, so several handlers share a registry.

The control plane (:mod:`sse_handler.cluster`, one per process and broker)
has its own collector, ``register_cluster_metrics(handler.cluster)``; no label
names a channel or a subject, so the number of series stays fixed:

==================================================  ===================================
``sse_presence_entries``                            gauge: (connection, channel) pairs
                                                    of this process in presence now
``sse_cluster_operations_total{operation}``         counter: deployment-wide operations
                                                    started here (``list``, ``get``,
                                                    ``send``, ``stop``,
                                                    ``stop_subject``, ``presence``)
``sse_cluster_requests_served_total{operation}``    counter: other processes' requests
                                                    answered here
``sse_cluster_unanswered_total``                    counter: processes that did not
                                                    answer an operation in time
``sse_cluster_processes``                           gauge: live processes as last seen
                                                    (Redis only)
==================================================  ===================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from tornado.web import RequestHandler

from .cluster import ControlPlane
from .handler import ServerSentEventHandler

__all__ = [
    "QUEUE_DEPTH_BUCKETS",
    "ClusterCollector",
    "EndpointCollector",
    "metrics_route",
    "register_cluster_metrics",
    "register_metrics",
]

#: Upper bounds of the ``sse_queue_depth`` buckets (frames).
QUEUE_DEPTH_BUCKETS = (0, 1, 4, 16, 64, 256, 1024)


class EndpointCollector(Collector):
    """Reads one handler's counters when Prometheus scrapes."""

    def __init__(self, handler: ServerSentEventHandler, endpoint: str) -> None:
        self.handler = handler
        self.endpoint = endpoint

    def collect(self) -> Iterator[Any]:
        snap = self.handler.stats()
        ep = [self.endpoint]
        labels = ["endpoint"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(ep, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(ep, value)
            return family

        def counter_by(
            name: str, doc: str, label: str, counts: dict[str, int]
        ) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=[*labels, label])
            for value, count in sorted(counts.items()):
                family.add_metric([self.endpoint, value], count)
            return family

        yield gauge("sse_connections_open", "Event-stream connections open now.", snap.open)
        yield counter("sse_connections_opened", "Connections opened.", snap.opened)
        yield counter_by(
            "sse_connections_closed", "Connections closed, by reason.", "reason", snap.closed
        )
        yield counter("sse_events_sent", "Events accepted for sending.", snap.events_sent)
        yield counter("sse_bytes_sent", "Bytes written to the sockets.", snap.bytes_sent)
        policy = str(self.handler.overflow_policy)
        yield counter_by(
            "sse_dropped",
            "Frames dropped by the overflow policy.",
            "policy",
            {policy: snap.dropped},
        )
        yield _queue_depths(ep, labels, snap.queue_depths)
        yield counter("sse_replay_requests", "Connections that asked for a replay.", snap.replays)
        yield counter_by(
            "sse_replay_resets", "Reset events sent, by reason.", "reason", snap.resets
        )
        broker = self.handler.broker
        healthy = getattr(broker, "reader_healthy", None)
        if healthy is not None:
            yield gauge(
                "sse_broker_reader_healthy",
                "1 while the broker's reader reads; 0 from a failed read until one succeeds.",
                1.0 if healthy else 0.0,
            )
            yield counter(
                "sse_broker_reader_restarts",
                "Restarts of the broker's reader after an unexpected error.",
                getattr(broker, "reader_restarts", 0),
            )
            yield counter(
                "sse_broker_malformed_entries",
                "Stream entries skipped because sse_handler did not write them.",
                getattr(broker, "malformed_entries", 0),
            )


class ClusterCollector(Collector):
    """Reads one control plane's counters when Prometheus scrapes."""

    def __init__(self, cluster: ControlPlane) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[Any]:
        cluster = self.cluster
        yield GaugeMetricFamily(
            "sse_presence_entries",
            "(connection, channel) pairs of this process in presence now.",
            value=cluster.presence_count(),
        )
        for name, doc, counts in (
            (
                "sse_cluster_operations",
                "Deployment-wide operations started here.",
                cluster.operations,
            ),
            (
                "sse_cluster_requests_served",
                "Other processes' requests answered here.",
                cluster.served,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["operation"])
            for operation, count in sorted(counts.items()):
                family.add_metric([operation], count)
            yield family
        yield CounterMetricFamily(
            "sse_cluster_unanswered",
            "Processes that did not answer an operation in time.",
            value=cluster.unanswered,
        )
        live = getattr(cluster, "live_processes", None)
        if live is not None:
            yield GaugeMetricFamily(
                "sse_cluster_processes", "Live processes as last seen.", value=len(live)
            )


def register_cluster_metrics(
    cluster: ControlPlane | None, registry: CollectorRegistry = REGISTRY
) -> ClusterCollector:
    """Expose the counters of ``cluster`` (e.g. ``handler.cluster``) in ``registry``."""
    if cluster is None:
        raise ValueError("no control plane to expose")
    collector = ClusterCollector(cluster)
    registry.register(collector)
    return collector


def _queue_depths(
    ep: list[str], labels: list[str], depths: list[int]
) -> GaugeHistogramMetricFamily:
    counts = [0] * (len(QUEUE_DEPTH_BUCKETS) + 1)
    for depth in depths:
        for i, bound in enumerate(QUEUE_DEPTH_BUCKETS):
            if depth <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    buckets: list[tuple[str, float]] = []
    running = 0
    for le, count in zip([*map(str, QUEUE_DEPTH_BUCKETS), "+Inf"], counts, strict=True):
        running += count
        buckets.append((le, float(running)))
    family = GaugeHistogramMetricFamily(
        "sse_queue_depth", "Frames queued per open connection.", labels=labels
    )
    family.add_metric(ep, buckets, gsum_value=float(sum(depths)))
    return family


def register_metrics(
    handler: ServerSentEventHandler,
    endpoint: str = "events",
    registry: CollectorRegistry = REGISTRY,
) -> EndpointCollector:
    """Expose ``handler``'s counters in ``registry`` under the ``endpoint`` label."""
    collector = EndpointCollector(handler, endpoint)
    registry.register(collector)
    return collector


class MetricsHandler(RequestHandler):
    """``GET`` answers the registry in Prometheus' text format."""

    def initialize(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.registry))


def metrics_route(
    pattern: str = "/metrics", registry: CollectorRegistry = REGISTRY
) -> tuple[str, type[RequestHandler], dict[str, Any]]:
    """A Tornado route serving ``registry``."""
    return (pattern, MetricsHandler, {"registry": registry})
