"""Snapshot mode (qemu-nbd's ``-s/--snapshot``): a temporary qcow2 overlay over any node.

Writes land in the overlay; the node below is only ever read through a backing edge, so it
is never modified. The overlay file is unlinked as soon as it is open: the open descriptor
keeps it alive, and nothing is left behind when the process exits, even by SIGKILL.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from .create import create_qcow2

if TYPE_CHECKING:
    from ..graph import Graph
    from ..node import Node


async def add_snapshot_overlay(
    graph: Graph,
    node_name: str,
    *,
    overlay_name: str | None = None,
    cluster_size: int = 65536,
    tmpdir: str | None = None,
) -> Node:
    """Open a temporary qcow2 node backed by ``node_name`` and return it.

    Export the returned node instead of the original. ``overlay_name`` defaults to
    ``"snapshot"`` (``"snapshot1"``, ... if taken); ``tmpdir`` defaults to ``$TMPDIR``
    (or /var/tmp, where large overlays do not fill a RAM-backed /tmp).
    """
    base = graph.node(node_name)
    if tmpdir is None:
        tmpdir = os.environ.get("TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    fd, path = tempfile.mkstemp(prefix="nbdserve-snapshot-", suffix=".qcow2", dir=tmpdir)
    os.close(fd)
    try:
        await create_qcow2(path, base.size, cluster_size=cluster_size)
        return await graph.add(
            {
                "driver": "qcow2",
                "node-name": overlay_name or _free_name(graph),
                "file": {"driver": "file", "filename": path},
                "backing": node_name,
            }
        )
    finally:
        os.unlink(path)


def _free_name(graph: Graph) -> str:
    name, n = "snapshot", 0
    while name in graph.nodes:
        n += 1
        name = f"snapshot{n}"
    return name
