"""``meshctl``: the operator's view of a running mesh (reads the KV and the nodes' HTTP).

    meshctl [--config FILE] [--kv embedded|consul] [--kv-path F] [--consul-addr H:P] COMMAND

    subs [VIDEO] [--json]   subscription counts per video and frontend, with totals
    nodes [--json]          registered nodes: role, name, address, health
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

from .config import load_config
from .errors import ConfigError, KVError
from .node import make_kv


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*map(str, r)) for r in rows])


def _run(ctx: click.Context, fn):
    overrides = ctx.obj["overrides"]
    try:
        cfg = load_config(ctx.obj["config"], overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None

    async def go():
        kv = make_kv(cfg)
        try:
            await kv.open()
            return await fn(kv)
        finally:
            await kv.close()

    try:
        return asyncio.run(go())
    except KVError as exc:
        raise click.ClickException(f"KV unavailable: {exc}") from None


@click.group()
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="TOML config file")
@click.option("--kv", "kv_backend", type=click.Choice(["embedded", "consul"]), default=None)
@click.option("--kv-path", default=None, help="embedded KV file")
@click.option("--consul-addr", default=None, help="Consul agent host:port")
@click.option("--dc", default=None, help="datacenter")
@click.pass_context
def main(ctx, config, kv_backend, kv_path, consul_addr, dc):
    """Inspect a livemesh deployment."""
    overrides = {}
    if kv_backend:
        overrides["kv.backend"] = kv_backend
    if kv_path:
        overrides["kv.path"] = kv_path
    if consul_addr:
        overrides["kv.consul_addr"] = consul_addr
    if dc:
        overrides["node.dc"] = dc
    ctx.obj = {"config": config, "overrides": overrides}


@main.command()
@click.argument("video", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def subs(ctx, video, as_json):
    """Subscription counts: per video, per frontend, and totals."""
    counts = _run(ctx, lambda kv: kv.read_counts(video))
    if as_json:
        out = {"videos": {v: {"frontends": f, "total": sum(f.values())} for v, f in sorted(counts.items())},
               "total": sum(sum(f.values()) for f in counts.values())}
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    rows = []
    for v, frontends in sorted(counts.items()):
        for name, count in sorted(frontends.items()):
            rows.append([v, name, count])
        rows.append([v, "(total)", sum(frontends.values())])
    if not rows:
        click.echo(f"no subscriptions{' for ' + video if video else ''}")
        return
    click.echo(_table(["VIDEO", "FRONTEND", "VIEWERS"], rows))
    click.echo(f"total viewers: {sum(sum(f.values()) for f in counts.values())} in {len(counts)} videos")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def nodes(ctx, as_json):
    """Registered nodes: role, name, datacenter, endpoints, health."""
    found = _run(ctx, lambda kv: kv.nodes())
    if as_json:
        click.echo(json.dumps([n.to_dict() for n in found], indent=2))
        return
    if not found:
        click.echo("no nodes registered")
        return
    rows = [[n.role, n.name, n.dc, n.http, " ".join(x for x in (n.router, n.pub) if x) or "-",
             "passing" if n.healthy else "critical"] for n in found]
    click.echo(_table(["ROLE", "NAME", "DC", "HTTP", "ZMQ", "HEALTH"], rows))


if __name__ == "__main__":
    sys.exit(main())
