"""Start an in-process server on a Unix socket for a test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nbdserve.block import Graph, open_graph
from nbdserve.config import ExportSpec
from nbdserve.exports import Catalogue, Export, attach_exports
from nbdserve.listeners import open_unix
from nbdserve.server import Server

from .nbdclient import NBDClient

MiB = 1 << 20


@dataclass
class Running:
    server: Server
    graph: Graph
    exports: list[Export]
    path: str

    async def connect(self, **kwargs: Any) -> NBDClient:
        return await NBDClient.connect(self.path, **kwargs)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"


async def start_server(nursery: trio.Nursery, tmp_path: Path,
                       blockdevs: Sequence[dict[str, Any]] | None = None,
                       exports: Sequence[ExportSpec] | None = None,
                       **server_options: Any) -> Running:
    """Memory disk "m0" of 16 MiB exported writable as "" unless told otherwise."""
    if blockdevs is None:
        blockdevs = [{"driver": "memory", "node-name": "m0", "size": 16 * MiB}]
    if exports is None:
        exports = [ExportSpec(name="", node_name="m0", writable=True)]
    graph = await open_graph(list(blockdevs))
    attached = attach_exports(graph, exports,
                              multi_conn_allowed=server_options.get("max_connections", 0) != 1)
    server = Server(Catalogue(attached), **server_options)
    path = str(tmp_path / "nbd.sock")
    await nursery.start(server.serve, [open_unix(path)])
    return Running(server, graph, attached, path)
