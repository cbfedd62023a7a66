"""One KV session for a command-line tool: load the configuration, open the KV it names, run
``fn(kv)``, close it.  ``meshctl``'s commands and ``meshctl bench`` share it; the configuration
and the overrides come from the ``meshctl`` group's options (``ctx.obj``).

``--all-dcs`` reads one KV per datacenter: Consul's WAN-federated datacenters through the
local agent (``?dc=``), or one embedded file per datacenter (``--dc-kv DC=PATH``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from mesh.config import load_config
from mesh.errors import ConfigError, KVError
from mesh.io.node import make_kv
from mesh.kv import KV

#: seconds for one datacenter's answer with --all-dcs (a DC whose servers are gone answers at
#: once with an error; one cut off by a partition makes the local servers wait for RPC)
DC_TIMEOUT = 5.0


def load_settings(ctx: click.Context):
    """The configuration ``meshctl``'s options name; a bad one is a clear command-line error."""
    try:
        return load_config(ctx.obj["config"], overrides=ctx.obj["overrides"])
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def run_with_kv(ctx: click.Context, fn):
    """``await fn(kv)`` on the configured KV, opened for the call and closed after it."""
    cfg = load_settings(ctx)

    async def go():
        kv = make_kv(cfg)
        try:
            await kv.open()
            return await fn(kv)
        finally:
            await kv.close()

    return _run_reporting_kv_errors(go())


def _run_reporting_kv_errors(main):
    """``asyncio.run(main)``; a KV that cannot be reached is a clear command-line error."""
    try:
        return asyncio.run(main)
    except KVError as exc:
        raise click.ClickException(f"KV unavailable: {exc}") from None


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


def run_in_every_dc(ctx: click.Context, read) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`read_all_dcs` over :func:`datacenter_kvs`; every unreachable DC is reported on
    stderr (the caller says the result is partial)."""
    cfg = load_settings(ctx)

    async def go():
        return await read_all_dcs(await datacenter_kvs(ctx, cfg), read)
    results, errors = _run_reporting_kv_errors(go())
    for dc, why in sorted(errors.items()):
        click.echo(f"meshctl: datacenter {dc} UNREACHABLE: {why}", err=True)
    return results, errors
