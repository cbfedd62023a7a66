"""Prometheus metrics of a node: ``GET /metrics`` on every frontend and dispatcher.

Theory of operation.  The nodes already count what matters in plain ``stats`` dicts (and a few
attributes: ``Fanout.deliveries``, ``Sequencer.duplicates``, the KV backend's ``kv_writes``).
Rather than a ``Counter.inc()`` beside every ``stats[...] += 1`` on the hot paths, a custom
collector reads those numbers at scrape time (the pattern prometheus-client documents as
"custom collectors" for proxying other systems' counters), so serving viewers costs nothing
extra.  The one thing the counters cannot give is a latency distribution: the frontend's
publish-to-fan-out histogram is observed by ``frontend.fanout.Fanout`` once per batch of a
video's events (not per viewer), from the oldest event's ``ts`` (stamped by the accepting
frontend) to the moment the batch is written to the viewers.  Clocks: every node of one host
shares one clock; across hosts the histogram includes their clock skew.

Each node has its own ``CollectorRegistry``, passed explicitly (never the global default
registry), so tests that start several nodes in one process never mix their series.

Metric names (all prefixed ``livemesh_``):

=================================  =========  ====================  =================================
name                               type       nodes                 meaning
=================================  =========  ====================  =================================
``node_info{role,name,dc}``        gauge      all                   always 1
``connections``                    gauge      frontend              open viewer SSE streams
``videos``                         gauge      all                   frontend: videos with local viewers
                                                                    (= SUB subscriptions); dispatcher:
                                                                    videos with a log here (owned or
                                                                    replicated)
``zmq_peers``                      gauge      frontend              dispatchers linked (in the registry)
``zmq_peers_lingering``            gauge      frontend              links of departed dispatchers kept
``events_in_total``                counter    all                   frontend: events received from
                                                                    dispatchers; dispatcher: events
                                                                    sequenced (retries not counted)
``events_out_total``               counter    all                   frontend: events written to local
                                                                    viewers (once per event); dispatcher:
                                                                    events sent on XPUB
``deliveries_total``               counter    frontend              event writes to viewers (events x viewers)
``publishes_total``                counter    frontend              publish requests accepted over HTTP
``publish_retries_total``          counter    frontend              publish attempts sent again
``ingest_fast_total``              counter    frontend              publish requests answered on the fast
                                                                    path (``frontend/ingest.py``)
``ingest_handoffs_total``          counter    frontend              connections the fast path handed to
                                                                    Tornado (every SSE stream, page, ...)
``viewers_opened_total``/``_closed``  counter  frontend             viewer streams opened / closed
``fanout_messages_total``          counter    dispatcher            XPUB event messages (batches)
``subscribes_total``               counter    dispatcher            subscriptions that reached the XPUB
``duplicates_total``               counter    dispatcher            publish retries answered from dedupe
``drops_total{reason}``            counter    all                   malformed, slow_viewer, sync_timeout,
                                                                    publish_failure (frontend);
                                                                    malformed, unroutable (dispatcher)
``kv_writes_total``                counter    all                   subscription-count write batches
``kv_requests_total``              counter    all                   requests the KV backend sent for them
``fanout_latency_seconds``         histogram  frontend              publish (event ``ts``) to write
=================================  =========  ====================  =================================
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import tornado.web
from prometheus_client import Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

PREFIX = "livemesh_"

#: seconds; the seed system's anchor is a P90 of 75 ms across real networks
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _info(role: str, name: str, dc: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(PREFIX + "node_info", "the node's identity (always 1)",
                          labels=["role", "name", "dc"])
    g.add_metric([role, name, dc], 1)
    return g


def _drops(reasons: dict[str, float]) -> CounterMetricFamily:
    c = CounterMetricFamily(PREFIX + "drops", "events, frames or viewers dropped, by reason",
                            labels=["reason"])
    for reason, value in sorted(reasons.items()):
        c.add_metric([reason], value)
    return c


def _kv(stats: dict, kv: Any) -> list[Metric]:
    return [_counter("kv_writes", "subscription-count write batches to the KV", stats.get("kv_writes", 0)),
            _counter("kv_requests", "requests the KV backend sent for count writes",
                     getattr(kv, "kv_writes", 0))]


class FrontendCollector(Collector):
    """Reads a ``frontend.node.Frontend``'s counters at scrape time."""

    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        link = node.link
        stats, link_stats = node.stats, (link.stats if link is not None else {})
        yield _info("frontend", node.name, node.cfg.node.dc)
        yield _gauge("connections", "open viewer SSE streams", len(node.table))
        yield _gauge("videos", "videos with local viewers (SUB subscriptions)", len(node.table.by_video))
        yield _gauge("zmq_peers", "dispatchers linked (in the registry)",
                     len(link.peers) if link is not None else 0)
        yield _gauge("zmq_peers_lingering", "links of dispatchers that left the registry",
                     len(link.retired) if link is not None else 0)
        yield _counter("events_in", "events received from dispatchers", link_stats.get("events_in", 0))
        yield _counter("events_out", "events written to local viewers (once per event)",
                       node.fanout.events_out)
        yield _counter("deliveries", "event writes to viewers (events x viewers)", node.fanout.deliveries)
        yield _counter("publishes", "publish requests accepted over HTTP", stats.get("publishes", 0))
        yield _counter("publish_retries", "publish attempts sent again", link_stats.get("publish_retries", 0))
        yield _counter("ingest_fast", "publish requests answered on the fast path", stats.get("ingest_fast", 0))
        yield _counter("ingest_handoffs", "connections the fast path handed to Tornado",
                       stats.get("ingest_handoffs", 0))
        yield _counter("viewers_opened", "viewer streams opened", stats.get("viewers_opened", 0))
        yield _counter("viewers_closed", "viewer streams closed", stats.get("viewers_closed", 0))
        yield _drops({"malformed": link_stats.get("malformed", 0),
                      "slow_viewer": stats.get("slow_viewers_cut", 0),
                      "sync_timeout": link_stats.get("sync_timeouts", 0),
                      "publish_failure": link_stats.get("publish_failures", 0)})
        yield from _kv(stats, node.kv)


class DispatcherCollector(Collector):
    """Reads a ``dispatcher.node.Dispatcher``'s counters at scrape time."""

    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        stats = node.stats
        events_in = stats.get("events_in", 0)
        yield _info("dispatcher", node.name, node.cfg.node.dc)
        yield _gauge("videos", "videos with a log on this dispatcher (owned or replicated)",
                     len(node.seq.videos))
        yield _counter("events_in", "events sequenced (publish retries not counted)", events_in)
        # each sequenced event leaves on the XPUB once, plus the replicas it publishes again
        # after their owner died (unless the node counts events_out itself)
        yield _counter("events_out", "events sent on the XPUB socket",
                       stats.get("events_out", events_in + stats.get("republished", 0)))
        yield _counter("fanout_messages", "XPUB event messages (batches)", stats.get("fanout_msgs", 0))
        yield _counter("subscribes", "subscriptions that reached the XPUB socket", stats.get("subscribes", 0))
        yield _counter("duplicates", "publish retries answered from the dedupe window",
                       getattr(node.seq, "duplicates", 0))
        yield _drops({"malformed": stats.get("malformed", 0), "unroutable": stats.get("unroutable", 0)})
        yield from _kv(stats, node.kv)


class BridgeCollector(Collector):
    """Reads a ``dispatcher.bridge.Bridge``'s counters (``mesh.core.bridging.Gate``) at scrape time:
    ``bridge_frames_total{direction}``, ``bridge_events_total{direction}``,
    ``bridge_subscriptions_total{direction,op}``, ``drops_total{reason}``.  Per-video frame
    counts are in ``/healthz`` only (one series per video would be unbounded cardinality)."""

    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node, gate = self.node, self.node.gate
        yield _info("bridge", node.name, node.dc)
        frames = CounterMetricFamily(PREFIX + "bridge_frames", "fan-out messages passed, by direction",
                                     labels=["direction"])
        events = CounterMetricFamily(PREFIX + "bridge_events", "events passed, by direction",
                                     labels=["direction"])
        for direction, per_video in sorted(gate.frames.items()):
            frames.add_metric([direction], sum(per_video.values()))
            events.add_metric([direction], gate.events.get(direction, 0))
        subs = CounterMetricFamily(PREFIX + "bridge_subscriptions",
                                   "(un)subscriptions passed upstream, by direction",
                                   labels=["direction", "op"])
        for key, value in sorted(gate.subscriptions.items()):
            direction, _, op = key.partition("_")
            subs.add_metric([direction, op], value)
        yield frames
        yield events
        yield subs
        yield _drops(dict(gate.dropped))


def bridge_registry(node: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BridgeCollector(node))
    return registry


def frontend_registry(node: Any) -> CollectorRegistry:
    """A registry for ``node`` (a Frontend); installs the latency hook on its fan-out."""
    registry = CollectorRegistry()
    registry.register(FrontendCollector(node))
    latency = Histogram(PREFIX + "fanout_latency_seconds",
                        "seconds from an event's publish (its ts) to its write to local viewers, "
                        "once per batch of a video's events (the batch's oldest event)",
                        buckets=LATENCY_BUCKETS, registry=registry)
    node.fanout.observe_latency = latency_observer(latency.observe)
    return registry


def dispatcher_registry(node: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DispatcherCollector(node))
    return registry


def latency_observer(observe: Callable[[float], None]) -> Callable[[float], None]:
    """``f(ts_ms)``: observe now minus an event's ``ts`` (ms since the epoch), in seconds,
    clamped at 0 (a publishing host's clock may run ahead)."""
    def observe_ts(ts_ms: float) -> None:
        observe(max(0.0, time.time() - ts_ms / 1000.0))
    return observe_ts


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: one registry in the Prometheus text format (OpenMetrics when the
    scraper's ``Accept`` asks for it)."""

    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        encode, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.write(encode(self.registry))
