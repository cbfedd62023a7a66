"""``meshctl bench``: the load generator's command line (``mesh.tools.bench`` does the work)."""

from __future__ import annotations

import asyncio
import json

import click

from mesh.tools.bench import Plan, run
from mesh.tools.bench.report import print_table
from mesh.tools.kvsession import run_with_kv
from mesh.tools.probes import frontend_urls


@click.command(name="bench")
@click.option("--frontend", "urls", multiple=True, metavar="URL",
              help="frontend base URL (repeatable; default: every healthy frontend in the KV)")
@click.option("--connections", "-n", default=1000, show_default=True, type=click.IntRange(1, 200000))
@click.option("--videos", "-v", default=10, show_default=True, type=click.IntRange(1, 100000))
@click.option("--hot", is_flag=True, help="all streams on one hot video")
@click.option("--rate", "-r", default=100.0, show_default=True, type=click.FloatRange(0.1, 100000),
              help="likes published per second")
@click.option("--duration", "-d", default=10.0, show_default=True, type=click.FloatRange(0.5, 600))
@click.option("--clients", default=0, type=click.IntRange(0, 64),
              help="client processes (0: one per 15,000 streams)")
@click.option("--sources", default=0, type=click.IntRange(0, 250),
              help="source addresses 127.0.0.1..K (0: one per 20,000 streams)")
@click.option("--client-nice", default=0, show_default=True, type=click.IntRange(0, 19),
              help="niceness of the client processes: on the nodes' own machine, >0 keeps "
                   "the load generator from delaying the nodes it measures")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def bench(ctx, urls, connections, videos, hot, rate, duration, clients, sources, client_nice, as_json):
    """Open N SSE streams, publish R likes/s for D seconds, report deliveries/s, latency
    percentiles, lost and duplicated events, and RSS per connection."""
    if not urls:
        urls = run_with_kv(ctx, frontend_urls)
    plan = Plan(list(urls), connections, videos, hot, rate, duration, clients, sources,
                client_nice=client_nice)
    echo = (lambda msg: click.echo(msg, err=True))
    result = asyncio.run(run(plan, echo))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_table(result, click.echo)
