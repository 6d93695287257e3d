"""Permissions: what each edge uses and shares, derived top-down, and the checks that refuse
conflicts. Pure functions over a candidate graph, so an edit is checked before it is applied.

Default rules per role (after QEMU's ``bdrv_default_perms``):

* ``filtered``: pass the parent's cumulative permissions through, share what it shares.
* ``backing``: consistent-read if the parent reads; share reads and unchanged writes, and
  writes and resizes only if the parent's users share writes.
* ``file`` (a format's storage): always consistent-read; write and resize whenever the parent
  node is writable (formats update metadata without guest writes); unshare write and resize,
  since nobody else may change a format's storage under it.
* ``primary``: a user's root edge; its permissions are the user's request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .errors import GraphError
from .types import Perm, Role

if TYPE_CHECKING:
    from .io import Child
    from .node import Node

__all__ = ["Plan", "describe", "plan"]

_WRITES = Perm.WRITE | Perm.WRITE_UNCHANGED


_SINGLE = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)


def describe(perm: Perm) -> str:
    """``Perm.WRITE | Perm.RESIZE`` -> ``"write, resize"``."""
    names = [str(p.name).lower().replace("_", "-") for p in _SINGLE if p & perm]
    return ", ".join(names) or "nothing"


def default_child_perms(role: Role, parent: Node, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    if role is Role.BACKING:
        use = perm & Perm.CONSISTENT_READ
        share = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if shared & Perm.WRITE:
            share |= Perm.WRITE | Perm.RESIZE
        return use, share
    if role is Role.FILE:
        use = Perm.CONSISTENT_READ | (perm & (Perm.WRITE | Perm.RESIZE))
        if perm & Perm.WRITE_UNCHANGED or not parent.read_only:
            use |= Perm.WRITE | Perm.RESIZE
        return use, shared & ~(Perm.WRITE | Perm.RESIZE)
    return perm & Perm.ALL, shared


class Plan:
    """The outcome of planning a candidate graph: nodes parents-first, cumulative permissions
    per node, and permissions per edge."""

    def __init__(
        self,
        order: list[Node],
        node_perms: dict[Node, tuple[Perm, Perm]],
        edge_perms: dict[Child, tuple[Perm, Perm]],
    ) -> None:
        self.order = order
        self.node_perms = node_perms
        self.edge_perms = edge_perms


def plan(nodes: Iterable[Node], targets: Mapping[Child, Node]) -> Plan:
    """Check the graph whose edges are ``targets`` (edge -> the node it points at): no cycle,
    no read-only node written, no user using what another user does not share."""
    parents_of: dict[Node, list[Child]] = {}
    children_of: dict[Node, list[Child]] = {}
    all_nodes: dict[Node, None] = dict.fromkeys(nodes)
    for edge, target in targets.items():
        all_nodes[target] = None
        parents_of.setdefault(target, []).append(edge)
        if edge.parent is not None:
            all_nodes[edge.parent] = None
            children_of.setdefault(edge.parent, []).append(edge)
    order = _topological(all_nodes, parents_of, children_of, targets)

    node_perms: dict[Node, tuple[Perm, Perm]] = {}
    edge_perms: dict[Child, tuple[Perm, Perm]] = {}
    for node in order:
        perm, shared = Perm.NONE, Perm.ALL
        users = parents_of.get(node, [])
        for edge in users:
            if edge.parent is None:
                edge_perms[edge] = (edge._req_perm, edge._req_shared)
            use, share = edge_perms[edge]
            perm |= use
            shared &= share
            if use & _WRITES and node.read_only:
                raise GraphError(
                    f"node '{node.name}' is read-only: {edge.user} cannot take write permission"
                )
        for a in users:
            for b in users:
                if a is not b and edge_perms[b][0] & ~edge_perms[a][1]:
                    raise GraphError(
                        f"permission conflict on node '{node.name}': {b.user} needs "
                        f"{describe(edge_perms[b][0] & ~edge_perms[a][1])}, which {a.user} "
                        f"does not share"
                    )
        node_perms[node] = (perm, shared)
        for edge in children_of.get(node, []):
            custom = node.driver.child_perms(edge.name, edge.role, perm, shared)
            edge_perms[edge] = (
                custom if custom is not None else default_child_perms(edge.role, node, perm, shared)
            )
    return Plan(order, node_perms, edge_perms)


def _topological(
    nodes: Mapping[Node, None],
    parents_of: Mapping[Node, list[Child]],
    children_of: Mapping[Node, list[Child]],
    targets: Mapping[Child, Node],
) -> list[Node]:
    pending = {n: sum(1 for e in parents_of.get(n, []) if e.parent is not None) for n in nodes}
    ready = [n for n, count in pending.items() if count == 0]
    order: list[Node] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for edge in children_of.get(node, []):
            child = targets[edge]
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    if len(order) != len(pending):
        stuck = sorted(n.name for n, count in pending.items() if count > 0)
        raise GraphError(f"this would create a cycle through node(s) {', '.join(stuck)}")
    return order
