"""The shared body of the node launchers: parse arguments, load config, set up logging, run."""

from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, Callable

import click

from mesh.io import logsetup
from mesh.config import Config, load_config
from mesh.errors import ConfigError


def node_main(role: str, run: Callable[[Config], Awaitable[None]]) -> None:
    @click.command(name=f"livemesh-{role}")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="TOML config file (default: $LIVEMESH_CONFIG)")
    @click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="override one config key (repeatable)")
    def command(config_path, sets):
        overrides = {}
        for item in sets:
            key, sep, value = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE", param_hint="--set")
            overrides[key.strip()] = value
        try:
            cfg = load_config(config_path, overrides=overrides)
            logsetup.configure(cfg.node.log_level, cfg.node.log_json, cfg.node.name or role)
            asyncio.run(run(cfg))
        except ConfigError as exc:  # also what a node finds building itself (bridge.peers)
            click.echo(f"livemesh-{role}: configuration error: {exc}", err=True)
            sys.exit(2)

    command()
