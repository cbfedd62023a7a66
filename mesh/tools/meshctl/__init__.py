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
    presence VIDEO [--frontend URL] [--json]
                            who watches a video
    keys NAME --dir DIR     a node's CURVE keypair
    bench [-n N] [-r R] [-d D] ...
                            the load generator (``mesh.tools.bench``)

This module holds the group and its options; each command group is a module beside it
(``registry``: subs, nodes; ``watch``: tail, presence; ``keys``; ``bench``), and ``mesh.tools.kvsession``
turns the options into an open KV for them.
"""

from __future__ import annotations

import click

from mesh.tools.meshctl.bench import bench
from mesh.tools.meshctl.keys import keys_command
from mesh.tools.meshctl.registry import nodes, subs
from mesh.tools.meshctl.watch import presence, tail


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


for command in (subs, nodes, tail, presence, bench, keys_command):
    main.add_command(command)
