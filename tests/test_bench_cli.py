"""``meshctl bench`` against a live mesh: a small, bounded run whose accounting must add up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.topology


def test_meshctl_bench_counts_every_delivery(topology, kv_path):
    topology.dispatcher("d1")
    fa, fb = topology.frontend("f1"), topology.frontend("f2")
    # the installed launcher, as users run it: its client processes are spawned children that
    # import the launcher again, which must not start a second bench
    out = subprocess.run([sys.executable, "bin/meshctl", "--kv-path", kv_path, "bench",
                          "-n", "40", "-v", "4", "-r", "20", "-d", "2", "--clients", "2", "--sources", "2",
                          "--client-nice", "5", "--json"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert sorted(r["plan"]["urls"]) == sorted([fa.url, fb.url])      # found in the registry
    assert r["connections_held"] == 40 and r["published_acked"] == 40
    assert r["deliveries"] == 40 * 10        # 10 likes per video, 10 streams per video
    assert r["events_received"] == r["deliveries"] and r["aggregated_events"] == 0
    assert (r["lost"], r["duplicates"], r["reordered"]) == (0, 0, 0)
    assert r["latency_samples"] > 0 and r["latency_ms"]["p50"] > 0
    assert r["latencies_observed"] >= r["latency_samples"] and r["plan"]["client_nice"] == 5
    assert 4 <= r["publish_connections"] <= 1024
    assert all(v is not None for v in r["rss_bytes_per_connection"].values())
    assert "deliveries/s" in out.stderr  # progress while it runs


def test_meshctl_bench_counts_aggregated_likes_as_their_count(topology):
    """A hot video past the aggregation threshold: ``likes`` events count as ``count``
    deliveries, their claimed id ranges add up, nothing lost or counted twice."""
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.fanout_tick": "0.5", "frontend.aggregate_likes_above": "2"})
    out = subprocess.run([sys.executable, "-m", "mesh.tools.meshctl", "bench", "--frontend", f.url, "--hot",
                          "-n", "20", "-r", "40", "-d", "2", "--clients", "1", "--sources", "1",
                          "--json"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["connections_held"] == 20 and r["published_acked"] == 80
    assert r["deliveries"] == 20 * 80
    assert r["aggregated_events"] > 0 and r["aggregate_mismatch"] == 0
    # fewer SSE events than likes: each ``likes`` event stood for several
    assert r["aggregated_events"] <= r["events_received"] < r["deliveries"]
    assert (r["lost"], r["duplicates"], r["reordered"]) == (0, 0, 0)
    assert r["latency_samples"] > 0 and r["bytes_per_delivery"] > 0
