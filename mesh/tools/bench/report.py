"""What a bench run reports: the result dict (``summary``, also printed with ``--json``) from
the merged client results and the servers' ``/healthz`` readings, and the table of it."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100.0 * len(values)))]


def summary(plan: dict, merged, acked: dict[str, int], errors: int, publish_connections: int,
            publish_s: float, rss_before: dict, rss_after: dict, cpu_before: dict, cpu_after: dict) -> dict:
    """The run's result: ``merged`` is the client processes' ``ClientResult`` summed, ``acked``
    the acknowledged likes per video; ``rss_*``/``cpu_*`` are each URL's ``/healthz`` field
    before and after (None where a server has none)."""
    deliveries = sum(sum(c) for c in merged.received.values())
    lost = sum(max(0, acked.get(v, 0) - c) for v, counts in merged.received.items() for c in counts)
    lat = merged.latencies
    rss_per_conn = {u: (round((rss_after[u] - rss_before[u]) * 1024 / max(1, merged.held_by_url.get(u, 0)))
                        if rss_after.get(u) is not None and rss_before.get(u) is not None else None)
                    for u in plan["urls"]}
    cpu = [cpu_after[u] - cpu_before[u] for u in plan["urls"]
           if cpu_after.get(u) is not None and cpu_before.get(u) is not None]
    return {
        "plan": plan,
        "connections_held": merged.connected, "connections_failed": merged.failed,
        "connections_failed_why": merged.why_failed,
        "published_acked": sum(acked.values()), "publish_errors": errors,
        "publish_connections": publish_connections,
        "publish_seconds": round(publish_s, 2),
        "deliveries": deliveries, "deliveries_per_s": round(deliveries / max(publish_s, 1e-9)),
        # SSE events the viewers received: a ``likes`` event is one, however many it counts
        "events_received": (events := deliveries - merged.aggregated_likes + merged.aggregated),
        "events_per_s": round(events / max(publish_s, 1e-9)),
        "lost": lost, "duplicates": merged.duplicates, "reordered": merged.reordered,
        "aggregated_events": merged.aggregated, "aggregate_mismatch": merged.aggregate_mismatch,
        "bytes_received": merged.bytes_received,
        "bytes_per_delivery": round(merged.bytes_received / deliveries, 1) if deliveries else None,
        "latency_ms": {name: (round(percentile(lat, q), 2) if lat else None)
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))},
        "latency_samples": len(lat), "latencies_observed": merged.latency_seen,
        "heartbeats": merged.heartbeats,
        "heartbeat_gap_s": {name: (round(percentile(merged.heartbeat_gaps, q), 3) if merged.heartbeat_gaps else None)
                            for name, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "rss_bytes_per_connection": rss_per_conn,
        "rss_kb_after_connect": rss_after,
        # CPU the servers spent from the first publish until the last delivery: robust to
        # other load on the machine, unlike deliveries/s and latency
        "server_cpu_s": round(sum(cpu), 3) if cpu else None,
        "server_cpu_us_per_delivery": round(sum(cpu) * 1e6 / deliveries, 3) if cpu and deliveries else None,
        # the load generator's readers (all client processes) over the same span, and per delivery
        "client_cpu_s": round(merged.cpu_s, 3),
        "client_cpu_us_per_delivery": round(merged.cpu_s * 1e6 / deliveries, 3) if deliveries else None,
    }


def print_table(r: dict, echo=print) -> None:
    lat = r["latency_ms"]
    rows = [
        ("connections held", f"{r['connections_held']:,} ({r['connections_failed']} failed)"),
        ("likes acknowledged", f"{r['published_acked']:,} in {r['publish_seconds']} s ({r['publish_errors']} errors, {r['publish_connections']} connections)"),
        ("deliveries", f"{r['deliveries']:,}"),
        ("deliveries/s", f"{r['deliveries_per_s']:,}"),
        ("SSE events received (/s)", f"{r['events_received']:,} ({r['events_per_s']:,})"),
        ("latency p50/p90/p99/p99.9 ms", " / ".join("-" if v is None else f"{v:.1f}" for v in lat.values())),
        ("lost / duplicated / reordered", f"{r['lost']:,} / {r['duplicates']:,} / {r['reordered']:,}"),
        ("aggregated likes events (mismatched)", f"{r['aggregated_events']:,} ({r['aggregate_mismatch']:,})"),
        ("bytes received (per delivery)", f"{r['bytes_received']:,} ({r['bytes_per_delivery'] or '-'})"),
        ("server CPU s (us per delivery)", "-" if r["server_cpu_s"] is None else
         f"{r['server_cpu_s']:.2f} ({r['server_cpu_us_per_delivery'] or '-'} us)"),
    ]
    rows.append(("client CPU s (us per delivery)", f"{r['client_cpu_s']:.2f} ({r['client_cpu_us_per_delivery'] or '-'} us)"))
    for url, b in r["rss_bytes_per_connection"].items():
        rows.append((f"RSS per connection {url}", "-" if b is None else f"{b / 1024:.1f} KiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        echo(f"{k:<{width}}  {v}")
