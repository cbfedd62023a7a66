"""Several datacenters on loopback for the multi-process tests: each DC has its own embedded KV
file, dispatchers, frontends and one bridge (``dispatcher.bridge``) whose export and relay
ports are chosen up front, since every bridge must know its peers' when it starts."""

from __future__ import annotations

import contextlib

from mesh.tools.topology import Topology, free_port


class DC:
    def __init__(self, name: str, topo: Topology, mesh: dict[str, "DC"]):
        self.name = name
        self.topo = topo
        self.mesh = mesh  # every DC of the test, by name (this one included)
        self.export_port = free_port()
        self.import_port = free_port()
        self.relay_port = free_port()
        self.frontends: list = []
        self.dispatchers: list = []
        self.bridge = None
        self.bridge_settings: dict = {}

    @property
    def front(self) -> str:
        return self.frontends[0].url

    def start_bridge(self):
        """(Re)start this DC's bridge on its fixed ports, linked to every other DC's."""
        others = [dc for dc in self.mesh.values() if dc is not self]
        peers = [f"{dc.name}=tcp://127.0.0.1:{dc.export_port}" for dc in others]
        relays = [f"{dc.name}=tcp://127.0.0.1:{dc.relay_port}" for dc in others]
        self.bridge = self.topo.bridge(f"bridge-{self.name}", peers, export_port=self.export_port,
                                       import_port=self.import_port, wait=False,
                                       **{"bridge.relay_port": self.relay_port,
                                          "bridge.relay_peers": ";".join(relays), **self.bridge_settings})
        return self.bridge


@contextlib.contextmanager
def datacenters(tmp_path, layout: dict[str, tuple[int, int]], extra: dict | None = None,
                bridge_settings: dict | None = None):
    """``layout``: DC name -> (dispatchers, frontends).  Yields ``{name: DC}`` once every node
    is ready; stops every process at the end, even on failure.  ``bridge_settings``: DC name
    -> extra ``--set`` values for that DC's bridge."""
    dcs: dict[str, DC] = {}
    for name in layout:
        topo = Topology(kv={"backend": "embedded", "path": str(tmp_path / f"kv-{name}.db"),
                            "liveness_ttl": "2"}, log_dir=str(tmp_path),
                        extra={"node.dc": name, "dispatcher.drain_seconds": "0.3", **(extra or {})})
        dcs[name] = DC(name, topo, dcs)
        dcs[name].bridge_settings = (bridge_settings or {}).get(name, {})
    try:
        starting = []
        for name, dc in dcs.items():
            dc.dispatchers = [dc.topo.dispatcher(f"{name}-d{j + 1}", wait=False) for j in range(layout[name][0])]
            starting += dc.dispatchers
        for node in starting:
            node.wait_ready()
        starting = [dc.start_bridge() for dc in dcs.values()]
        for name, dc in dcs.items():
            dc.frontends = [dc.topo.frontend(f"{name}-f{i + 1}", wait=False) for i in range(layout[name][1])]
            starting += dc.frontends
        for node in starting:
            node.wait_ready()
        yield dcs
    finally:
        for dc in dcs.values():
            dc.topo.close()
