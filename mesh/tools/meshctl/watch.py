"""``meshctl tail`` and ``meshctl presence``: what a frontend shows a video's viewers (its
events live, who watches it), read from a frontend given by ``--frontend`` or found in the
registry."""

from __future__ import annotations

import asyncio
import json
import time
import unicodedata

import click
from tornado.httpclient import AsyncHTTPClient

from mesh.wire import protocol as P
from mesh.tools.kvsession import run_with_kv
from mesh.tools.probes import pick_frontend
from mesh.tools.sse_client import SSEClient, SSEError

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


def _check_video(video: str) -> None:
    if not P.valid_video_id(video):
        raise click.BadParameter("1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter "
                                 "or digit", param_hint="VIDEO")


_FRONTEND_HELP = "frontend base URL (default: a healthy frontend from the registry)"


@click.command()
@click.argument("video")
@click.option("--frontend", "frontend_url", default=None, metavar="URL", help=_FRONTEND_HELP)
@click.option("--json", "as_json", is_flag=True, help="print each event's raw JSON data")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="exit after N likes and comments")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="exit after S seconds (status 1 if --count events did not come)")
@click.pass_context
def tail(ctx, video, frontend_url, as_json, count, timeout):
    """Watch VIDEO's events live: one line per event (time, kind, user, text)."""
    _check_video(video)
    base = frontend_url or run_with_kv(ctx, pick_frontend)
    try:
        status = asyncio.run(tail_events(base, video, as_json, count, timeout))
    except KeyboardInterrupt:
        status = 130
    ctx.exit(status)


@click.command()
@click.argument("video")
@click.option("--frontend", "frontend_url", default=None, metavar="URL", help=_FRONTEND_HELP)
@click.option("--limit", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="users per page fetched")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def presence(ctx, video, frontend_url, limit, as_json):
    """Who watches VIDEO: the viewer count over all frontends and the identified users."""
    _check_video(video)
    base = (frontend_url or run_with_kv(ctx, pick_frontend)).rstrip("/")

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
