"""``meshctl``: the operator's view of a running mesh (reads the KV and the nodes' HTTP).

    meshctl [--config FILE] [--kv embedded|consul] [--kv-path F] [--consul-addr H:P] COMMAND

    subs [VIDEO] [--json] [--all-dcs]
                            subscription counts per video and frontend, with totals
                            (--all-dcs: per DC and summed: Consul's WAN-federated
                            datacenters, or the embedded files given by --dc-kv)
    nodes [--json] [--all-dcs]
                            registered nodes: role, name, address, health, connections
    tail VIDEO [--frontend URL] [--json] [--count N] [--timeout S]
                            a video's events live, one line each
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import unicodedata
from typing import Any

import click
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from mesh.wire import protocol as P
from mesh.config import load_config
from mesh.errors import ConfigError, KVError
from mesh.kv import KV, NodeInfo, ROLE_FRONTEND
from mesh.io.node import make_kv
from mesh.tools.sse_client import SSEClient, SSEError

#: seconds to wait for one node's /healthz
PROBE_TIMEOUT = 1.5


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*map(str, r)) for r in rows])


def _load(ctx: click.Context):
    try:
        return load_config(ctx.obj["config"], overrides=ctx.obj["overrides"])
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _run(ctx: click.Context, fn):
    cfg = _load(ctx)

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
@click.option("--consul-addr", default=None,
              help="Consul agent host:port (implies --kv consul unless --kv is given)")
@click.option("--dc", default=None, help="datacenter")
@click.option("--dc-kv", "dc_kvs", multiple=True, metavar="DC=PATH",
              help="another datacenter's embedded KV file (repeatable; for subs --all-dcs)")
@click.pass_context
def main(ctx, config, kv_backend, kv_path, consul_addr, dc, dc_kvs):
    """Inspect a livemesh deployment."""
    overrides = {}
    if kv_backend:
        overrides["kv.backend"] = kv_backend
    if kv_path:
        overrides["kv.path"] = kv_path
    if consul_addr:
        overrides["kv.consul_addr"] = consul_addr
        overrides.setdefault("kv.backend", "consul")
    if dc:
        overrides["node.dc"] = dc
    dc_paths = {}
    for item in dc_kvs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r}: expected DC=PATH", param_hint="--dc-kv")
        dc_paths[name] = path
    ctx.obj = {"config": config, "overrides": overrides, "dc_kvs": dc_paths}


#: seconds for one datacenter's answer with --all-dcs (a DC whose servers are gone answers at
#: once with an error; one cut off by a partition makes the local servers wait for RPC)
DC_TIMEOUT = 5.0


async def datacenter_kvs(ctx: click.Context, cfg) -> dict[str, KV]:
    """``dc -> KV`` for ``--all-dcs``.  Consul: every datacenter the local agent knows (WAN
    federation), each read through that agent with ``?dc=``.  Embedded: a file per DC, this
    one's (``--kv-path`` / config, as ``--dc``) and each ``--dc-kv DC=PATH``."""
    if cfg.kv.backend == "consul":
        local = make_kv(cfg)
        try:
            return {dc: local.in_datacenter(dc) for dc in await local.datacenters()}
        finally:
            await local.close()
    from mesh.kv.embedded import EmbeddedKV
    paths = dict(ctx.obj["dc_kvs"])
    if cfg.kv.backend == "embedded" and (ctx.obj["overrides"].get("kv.path") or not paths):
        paths.setdefault(cfg.node.dc, cfg.kv.path)
    if not paths:
        raise click.ClickException("--all-dcs needs the datacenters' KV files (--dc-kv DC=PATH) "
                                   "or --kv consul")
    return {dc: EmbeddedKV(path) for dc, path in paths.items()}


async def read_all_dcs(kvs: dict[str, KV], read, timeout: float = DC_TIMEOUT
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    """``read(kv)`` in every datacenter at once: ``(dc -> result, dc -> why it failed)``; a DC
    that fails or does not answer within ``timeout`` is in the second dict only."""
    async def one(kv: KV):
        try:
            await kv.open()
            return await asyncio.wait_for(read(kv), timeout)
        finally:
            await kv.close()
    names = sorted(kvs)
    outcomes = await asyncio.gather(*(one(kvs[n]) for n in names), return_exceptions=True)
    results, errors = {}, {}
    for dc, outcome in zip(names, outcomes):
        if isinstance(outcome, asyncio.TimeoutError):
            errors[dc] = f"no answer within {timeout:g} s"
        elif isinstance(outcome, (KVError, OSError)):
            errors[dc] = str(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results[dc] = outcome
    return results, errors


def _run_all_dcs(ctx: click.Context, read) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`read_all_dcs` over :func:`datacenter_kvs`; every unreachable DC is reported on
    stderr (the caller says the result is partial)."""
    cfg = _load(ctx)

    async def go():
        return await read_all_dcs(await datacenter_kvs(ctx, cfg), read)
    try:
        results, errors = asyncio.run(go())
    except KVError as exc:
        raise click.ClickException(f"KV unavailable: {exc}") from None
    for dc, why in sorted(errors.items()):
        click.echo(f"meshctl: datacenter {dc} UNREACHABLE: {why}", err=True)
    return results, errors


def _partial_note(errors: dict[str, str]) -> str:
    return f" (PARTIAL: {', '.join(sorted(errors))} unreachable)" if errors else ""


@main.command()
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


def _subs_all_dcs(ctx: click.Context, video: str | None, as_json: bool) -> None:
    """Each DC has its own KV: read them all and sum, saying which DCs are missing."""
    per_dc, errors = _run_all_dcs(ctx, lambda kv: kv.read_counts(video))
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


async def probe(node: NodeInfo, timeout: float = PROBE_TIMEOUT) -> dict | None:
    """The node's ``/healthz`` JSON, or None when it does not answer in time."""
    if not node.http:
        return None
    try:  # an unreachable node answers 599 with no body (raise_error=False)
        resp = await AsyncHTTPClient().fetch(f"{node.http}/healthz", connect_timeout=timeout,
                                             request_timeout=timeout, raise_error=False)
        body = json.loads(resp.body or b"null")
    except (OSError, ValueError, asyncio.TimeoutError, HTTPClientError):
        return None
    return body if isinstance(body, dict) else None


async def probe_all(kv: KV, role: str | None = None) -> list[tuple[NodeInfo, dict | None]]:
    """Registered nodes with their ``/healthz`` answers, probed concurrently."""
    found = await kv.nodes(role)
    healths = await asyncio.gather(*(probe(n) for n in found))
    return list(zip(found, healths))


def _status(health: dict | None) -> str:
    return "unreachable" if health is None else str(health.get("status", "?"))


def _connections(health: dict | None) -> int | None:
    value = (health or {}).get("connections")
    return value if isinstance(value, int) else None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--all-dcs", is_flag=True,
              help="every datacenter's nodes (Consul: the federated DCs; embedded: --dc-kv files)")
@click.pass_context
def nodes(ctx, as_json, all_dcs):
    """Registered nodes: role, name, datacenter, endpoints, registry health, the node's own
    /healthz status and (frontends) its open viewer connections."""
    errors: dict[str, str] = {}
    if all_dcs:
        per_dc, errors = _run_all_dcs(ctx, probe_all)
        found = [pair for dc in sorted(per_dc) for pair in per_dc[dc]]
    else:
        found = _run(ctx, probe_all)
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


# --- tail ---------------------------------------------------------------------------------

#: control characters and line/paragraph separators, shown escaped: one line per event, and
#: no comment can move the operator's cursor or recolour their terminal
_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape_text(text: str) -> str:
    out = []
    for ch in text:
        if ord(ch) in _ESCAPES:
            out.append(_ESCAPES[ord(ch)])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def format_event(name: str, data: str) -> str:
    """``HH:MM:SS.mmmZ  kind     user  text`` (UTC, from the event's ``ts``)."""
    try:
        ev = json.loads(data)
    except ValueError:
        ev = None
    if not isinstance(ev, dict):
        return f"{_clock(None)}  {name:<7}  {escape_text(data)}"
    parts = [_clock(ev.get("ts")), f"{name:<7}", escape_text(str(ev.get("user") or "-"))]
    if ev.get("text") is not None:
        parts.append(escape_text(str(ev["text"])))
    elif name not in (P.KIND_LIKE, P.KIND_COMMENT):  # count, reset, ...: show the payload
        parts.append(escape_text(json.dumps({k: v for k, v in ev.items() if k != "ts"},
                                            ensure_ascii=False, sort_keys=True)))
    return "  ".join(parts)


def json_line(name: str, data: str) -> str:
    """A like's or comment's data as it came; other events' data gain ``"kind": name``."""
    if name in P.EVENT_KINDS:
        return data
    try:
        ev = json.loads(data)
    except ValueError:
        ev = data
    if not isinstance(ev, dict):
        ev = {"data": ev}
    return json.dumps({"kind": name, **ev}, ensure_ascii=False, separators=(",", ":"))


def _clock(ts_ms) -> str:
    t = ts_ms / 1000.0 if isinstance(ts_ms, (int, float)) else time.time()
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


async def pick_frontend(kv: KV) -> str:
    """A frontend from the registry whose /healthz says ok (else any that answers)."""
    found = [(n, h) for n, h in await probe_all(kv, ROLE_FRONTEND) if h is not None and n.http]
    for node, health in found:
        if node.healthy and health.get("status") == "ok":
            return node.http
    if found:
        return found[0][0].http
    raise click.ClickException("no reachable frontend in the registry (use --frontend URL)")


async def tail_events(base: str, video: str, as_json: bool, count: int | None,
                      timeout: float | None) -> int:
    """Print the video's events until ``count`` likes and comments or ``timeout``;
    reconnects (with Last-Event-ID) when the stream ends.  Returns the exit status.  Other
    events (presence ``count``/``join``/``leave``, ``reset``) are printed but not counted: they
    are state, not part of the video's chain."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    url = f"{base.rstrip('/')}/v1/videos/{video}/events"
    seen, last_id, opened = 0, None, False

    def left() -> float:
        return 3600.0 * 24 if deadline is None else max(0.0, deadline - loop.time())

    while left() > 0:
        client = SSEClient(url, last_event_id=last_id)
        try:
            await client.connect(timeout=min(10.0, left()))
        except SSEError as exc:
            raise click.ClickException(f"{url}: HTTP {exc.status}: {_error_text(exc.body)}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            if not opened:
                raise click.ClickException(f"cannot open {url}: {exc or 'timed out'}") from None
            click.echo(f"tail: reconnect failed ({exc or 'timed out'}); retrying", err=True)
            await asyncio.sleep(min(2.0, left()))
            continue
        opened = True
        click.echo(f"tail: watching {video} on {base} (Ctrl-C to stop)", err=True)
        try:
            while True:
                ev = await client.next_event(left())
                last_id = ev.id or last_id
                click.echo(json_line(ev.event, ev.data) if as_json else format_event(ev.event, ev.data))
                if ev.event in P.EVENT_KINDS:
                    seen += 1
                    if count is not None and seen >= count:
                        return 0
        except asyncio.TimeoutError:
            break
        except EOFError:
            retry = (client.parser.retry or 2000) / 1000.0
            click.echo(f"tail: stream closed; reconnecting in {retry:.1f}s", err=True)
            await asyncio.sleep(min(retry, left()))
        finally:
            client.close()
    if count is not None:
        click.echo(f"tail: timed out after {timeout}s with {seen} of {count} events", err=True)
        return 1
    return 0


def _error_text(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "no body"


@main.command()
@click.argument("video")
@click.option("--frontend", "frontend_url", default=None, metavar="URL",
              help="frontend base URL (default: a healthy frontend from the registry)")
@click.option("--json", "as_json", is_flag=True, help="print each event's raw JSON data")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="exit after N likes and comments")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="exit after S seconds (status 1 if --count events did not come)")
@click.pass_context
def tail(ctx, video, frontend_url, as_json, count, timeout):
    """Watch VIDEO's events live: one line per event (time, kind, user, text)."""
    if not P.valid_video_id(video):
        raise click.BadParameter("1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter "
                                 "or digit", param_hint="VIDEO")
    base = frontend_url or _run(ctx, pick_frontend)
    try:
        status = asyncio.run(tail_events(base, video, as_json, count, timeout))
    except KeyboardInterrupt:
        status = 130
    ctx.exit(status)


@main.command()
@click.argument("video")
@click.option("--frontend", "frontend_url", default=None, metavar="URL",
              help="frontend base URL (default: a healthy frontend from the registry)")
@click.option("--limit", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="users per page fetched")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def presence(ctx, video, frontend_url, limit, as_json):
    """Who watches VIDEO: the viewer count over all frontends and the identified users."""
    if not P.valid_video_id(video):
        raise click.BadParameter("1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter "
                                 "or digit", param_hint="VIDEO")
    base = (frontend_url or _run(ctx, pick_frontend)).rstrip("/")

    async def fetch_all() -> dict:
        client = AsyncHTTPClient()
        users, offset, page = [], 0, {}
        while True:
            resp = await client.fetch(f"{base}/v1/videos/{video}/presence?offset={offset}&limit={limit}",
                                      raise_error=False, request_timeout=10)
            if resp.code != 200:
                raise click.ClickException(f"{base}: HTTP {resp.code}: {_error_text(resp.body or b'')}")
            page = json.loads(resp.body)
            users += page["users"]
            offset += len(page["users"])
            if not page["users"] or offset >= page["total_users"]:
                return {"video": video, "count": page["count"], "users": users}

    try:
        out = asyncio.run(fetch_all())
    except OSError as exc:
        raise click.ClickException(f"cannot reach {base}: {exc}") from None
    if as_json:
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    click.echo(f"{video}: {out['count']} watching, {len(out['users'])} identified")
    for user in out["users"]:
        click.echo(f"  {user}")


from mesh.tools.bench import bench_command  # noqa: E402 - ``meshctl bench`` (load generator)

main.add_command(bench_command())

from mesh.io.curve import keys_command  # noqa: E402 - ``meshctl keys NAME --dir DIR`` (CURVE keypairs)

main.add_command(keys_command)


if __name__ == "__main__":
    sys.exit(main())
