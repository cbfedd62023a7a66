"""``GET /metrics`` on frontends and dispatchers: Prometheus text that matches what happened."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from frontend.fanout import Fanout
from mesh.wire import protocol as P
from mesh.io.metrics import latency_observer
from mesh.core.subscriptions import SubscriptionTable

from helpers import comment, like, viewer, wait_until


async def scrape(url: str) -> dict[str, float]:
    """``{sample name with sorted labels: value}``, e.g. ``livemesh_drops_total{reason=malformed}``."""
    resp = await AsyncHTTPClient().fetch(f"{url}/metrics", request_timeout=5)
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.mark.topology
async def test_metrics_reflect_what_the_mesh_did(topology):
    d1, d2 = topology.dispatcher("d1"), topology.dispatcher("d2")
    fa, fb = topology.frontend("f1"), topology.frontend("f2")
    va = [await viewer(fa.url, "m1"), await viewer(fa.url, "m1")]
    vb = [await viewer(fb.url, "m1"), await viewer(fb.url, "m2")]
    for i in range(5):
        await like(fa.url, "m1", user=f"u{i}")
    for i in range(3):
        await comment(fb.url, "m2", f"comment {i}\nsecond line")
    await like(fb.url, "nobody-watches")
    for v in (*va, vb[0]):
        assert len(await v.events(5)) == 5
    assert len(await vb[1].events(3)) == 3

    a, b = await scrape(fa.url), await scrape(fb.url)
    assert a['livemesh_node_info{dc=dc1,name=f1,role=frontend}'] == 1
    assert (a["livemesh_connections"], b["livemesh_connections"]) == (2, 2)
    assert (a["livemesh_videos"], b["livemesh_videos"]) == (1, 2)
    assert a["livemesh_zmq_peers"] == b["livemesh_zmq_peers"] == 2
    # f1 watches m1 only (5 events); f2 watches m1 and m2 (5 + 3)
    assert (a["livemesh_events_in_total"], b["livemesh_events_in_total"]) == (5, 8)
    assert (a["livemesh_events_out_total"], b["livemesh_events_out_total"]) == (5, 8)
    assert (a["livemesh_deliveries_total"], b["livemesh_deliveries_total"]) == (5 * 2, 5 + 3)
    assert (a["livemesh_publishes_total"], b["livemesh_publishes_total"]) == (5, 4)
    assert (a["livemesh_ingest_fast_total"], b["livemesh_ingest_fast_total"]) == (5, 4)  # all on the fast path
    assert a["livemesh_ingest_handoffs_total"] >= 2  # the viewers' streams (and the scrape) are Tornado's
    for m in (a, b):
        assert m["livemesh_viewers_opened_total"] == 2 and m["livemesh_viewers_closed_total"] == 0
        for reason in ("malformed", "slow_viewer", "sync_timeout", "publish_failure"):
            assert m[f"livemesh_drops_total{{reason={reason}}}"] == 0
        assert m["livemesh_kv_writes_total"] >= 1 and m["livemesh_kv_requests_total"] >= 1
        # once per batch of a video's events, not per viewer: 1..events batches
        count = m["livemesh_fanout_latency_seconds_count"]
        assert 1 <= count <= m["livemesh_events_out_total"]
        assert m["livemesh_fanout_latency_seconds_bucket{le=+Inf}"] == count
        assert 0 <= m["livemesh_fanout_latency_seconds_sum"] < 5 * count
    assert a["livemesh_fanout_latency_seconds_count"] <= 5  # not x2 for its two viewers

    m1, m2 = await scrape(d1.url), await scrape(d2.url)
    assert m1['livemesh_node_info{dc=dc1,name=d1,role=dispatcher}'] == 1
    assert m1["livemesh_events_in_total"] + m2["livemesh_events_in_total"] == 9
    assert m1["livemesh_events_out_total"] + m2["livemesh_events_out_total"] == 9
    # m1, m2, nobody-watches: each has a log at its owner (and maybe a replica at its backup)
    assert 3 <= m1["livemesh_videos"] + m2["livemesh_videos"] <= 6
    assert m1["livemesh_fanout_messages_total"] + m2["livemesh_fanout_messages_total"] >= 3
    for m in (m1, m2):
        assert m["livemesh_drops_total{reason=malformed}"] == 0

    # gauges follow viewers leaving
    va[0].close()
    vb[1].close()

    async def gauges():
        a, b = await scrape(fa.url), await scrape(fb.url)
        return (a["livemesh_connections"], b["livemesh_connections"], b["livemesh_videos"],
                a["livemesh_viewers_closed_total"]) == (1, 1, 1, 1)
    await wait_until(gauges, timeout=5, what="gauges after two viewers left")
    for v in (va[1], vb[0]):
        v.close()


class FakeViewer:
    def __init__(self):
        self.data = b""

    def send(self, data, events=None):
        self.data += data


async def test_fanout_observes_latency_once_per_batch_not_per_viewer():
    table = SubscriptionTable()
    viewers = [FakeViewer() for _ in range(5)]
    for i, v in enumerate(viewers):
        table.add(i, "v", v)
    observed = []
    fanout = Fanout(table, slice_size=2)  # 5 viewers: a sliced delivery
    fanout.observe_latency = observed.append

    def event(seq, ts):
        e = P.make_event("v", P.KIND_LIKE, "u", None, ts=ts)
        e["epoch"], e["seq"] = 1, seq
        return e
    fanout.deliver("v", [event(1, 2000.0), event(2, 1000.0)])
    fanout.deliver("v", [event(3, 500.0)])  # queued behind the sliced delivery in progress
    await wait_until(lambda: "v" not in fanout._backlog, timeout=2, what="slices written")
    assert observed == [500.0]  # both batches went out together: one observation, the oldest
    assert fanout.deliveries == 3 * 5 and all(v.data.count(b"event: like") == 3 for v in viewers)
    fanout.slice_size = 500
    fanout.deliver("v", [event(4, 700.0)])
    assert observed == [500.0, 700.0]
    for i in range(5):
        table.remove(i)
    fanout.deliver("v", [event(5, 800.0)])  # nobody watching: nothing written, nothing observed
    assert len(observed) == 2


def test_latency_observer_converts_ms_to_seconds_and_clamps():
    got = []
    observe = latency_observer(got.append)
    observe(time.time() * 1000 - 250)
    observe(time.time() * 1000 + 60_000)  # a publishing host's clock ahead of ours
    assert 0.25 <= got[0] < 1.0 and got[1] == 0.0
