"""``meshctl subs`` and ``meshctl nodes``: what the KV holds (subscription counts, the node
registry), for this datacenter or, with ``--all-dcs``, for every one."""

from __future__ import annotations

import json

import click

from mesh.tools.kvsession import run_in_every_dc, run_with_kv
from mesh.tools.probes import probe_all


def _table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*map(str, r)) for r in rows])


def _partial_note(errors: dict[str, str]) -> str:
    return f" (PARTIAL: {', '.join(sorted(errors))} unreachable)" if errors else ""


@click.command()
@click.argument("video", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--all-dcs", is_flag=True,
              help="sum over every datacenter: Consul's federated DCs (?dc=), or this one "
                   "(--kv-path / config) and each --dc-kv DC=PATH")
@click.pass_context
def subs(ctx, video, as_json, all_dcs):
    """Subscription counts: per video, per frontend, and totals."""
    if all_dcs:
        return _subs_all_dcs(ctx, video, as_json)
    counts = run_with_kv(ctx, lambda kv: kv.read_counts(video))
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


def _subs_all_dcs(ctx: click.Context, video: str | None, as_json: bool) -> None:
    """Each DC has its own KV: read them all and sum, saying which DCs are missing."""
    per_dc, errors = run_in_every_dc(ctx, lambda kv: kv.read_counts(video))
    totals = {dc: sum(sum(f.values()) for f in counts.values()) for dc, counts in per_dc.items()}
    videos: dict[str, dict[str, int]] = {}
    for dc, counts in per_dc.items():
        for v, frontends in counts.items():
            videos.setdefault(v, {})[dc] = sum(frontends.values())
    if as_json:
        click.echo(json.dumps({"dcs": {dc: {"videos": {v: {"frontends": f, "total": sum(f.values())}
                                                      for v, f in sorted(c.items())},
                                            "total": totals[dc]} for dc, c in per_dc.items()},
                               "videos": {v: {"dcs": d, "total": sum(d.values())} for v, d in sorted(videos.items())},
                               "total": sum(totals.values()),
                               "unreachable": errors, "partial": bool(errors)}, indent=2, sort_keys=True))
        return
    rows = [[v, dc, n] for v, by_dc in sorted(videos.items()) for dc, n in sorted(by_dc.items())]
    rows += [[v, "(all dcs)", sum(by_dc.values())] for v, by_dc in sorted(videos.items())]
    if not rows:
        click.echo(f"no subscriptions{' for ' + video if video else ''} in "
                   f"{', '.join(sorted(per_dc)) or 'any reachable datacenter'}{_partial_note(errors)}")
        return
    click.echo(_table(["VIDEO", "DC", "VIEWERS"], sorted(rows, key=lambda r: (r[0], r[1] == "(all dcs)", r[1]))))
    click.echo(f"total viewers: {sum(totals.values())} in {len(videos)} videos over "
               f"{len(per_dc)} datacenters{_partial_note(errors)}")


def _status(health: dict | None) -> str:
    return "unreachable" if health is None else str(health.get("status", "?"))


def _connections(health: dict | None) -> int | None:
    value = (health or {}).get("connections")
    return value if isinstance(value, int) else None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--all-dcs", is_flag=True,
              help="every datacenter's nodes (Consul: the federated DCs; embedded: --dc-kv files)")
@click.pass_context
def nodes(ctx, as_json, all_dcs):
    """Registered nodes: role, name, datacenter, endpoints, registry health, the node's own
    /healthz status and (frontends) its open viewer connections."""
    errors: dict[str, str] = {}
    if all_dcs:
        per_dc, errors = run_in_every_dc(ctx, probe_all)
        found = [pair for dc in sorted(per_dc) for pair in per_dc[dc]]
    else:
        found = run_with_kv(ctx, probe_all)
    if as_json:
        listed = [{**n.to_dict(), "status": _status(h), "connections": _connections(h)} for n, h in found]
        out = {"nodes": listed, "unreachable": errors, "partial": bool(errors)} if all_dcs else listed
        click.echo(json.dumps(out, indent=2))
        return
    if not found:
        click.echo(f"no nodes registered{_partial_note(errors)}")
        return
    rows = [[n.role, n.name, n.dc, n.http, " ".join(x for x in (n.router, n.pub) if x) or "-",
             "passing" if n.healthy else "critical", _status(h),
             "-" if _connections(h) is None else _connections(h)] for n, h in found]
    click.echo(_table(["ROLE", "NAME", "DC", "HTTP", "ZMQ", "HEALTH", "STATUS", "CONNECTIONS"], rows))
    if errors:
        click.echo(f"{len(found)} nodes{_partial_note(errors)}")
