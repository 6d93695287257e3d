"""The graph: building nodes from QEMU-style options, attaching users, and edits as
all-or-nothing transactions (planned on a copy by ``perms.plan``, then applied whole)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from .driver import Driver
from .drivers import load_driver
from .errors import GraphError
from .io import Child
from .node import Node
from .options import coerce, parse_bool, parse_dotted, unflatten
from .perms import plan
from .types import Perm, Role

__all__ = ["Graph", "open_graph"]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
_DISCARD = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
_DETECT_ZEROES = ("off", "on", "unmap")
_GENERIC = {"node-name", "driver", "read-only", "discard", "detect-zeroes", "cache", "copy-on-read"}


async def open_graph(options: Iterable[Mapping[str, Any] | str]) -> Graph:
    """A graph with one node per item (a dict, or qemu's dotted ``key=value,...`` form),
    opened in order so later items can name earlier nodes. All or nothing."""
    graph = Graph()
    try:
        for item in options:
            await graph.add(item)
    except BaseException:
        with trio.CancelScope(shield=True):
            await graph.close()
        raise
    return graph


class Graph:
    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._auto_names = 0

    @property
    def nodes(self) -> Mapping[str, Node]:
        return self._nodes

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise GraphError(f"no node named '{name}'") from None

    def __repr__(self) -> str:
        return f"<Graph {sorted(self._nodes)}>"

    def info(self) -> list[dict[str, Any]]:
        """Every node's :meth:`Node.info`, parents before children."""
        return [node.info() for node in plan(self._nodes.values(), self._edges()).order]

    async def __aenter__(self) -> Graph:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            await self.close()

    # -- building -------------------------------------------------------------------------
    async def add(self, options: Mapping[str, Any] | str) -> Node:
        """Open a node (and any children given inline) from QEMU-style options."""
        if isinstance(options, str):
            options = parse_dotted(options)
        created: list[Node] = []
        try:
            return await self._open_node(options, created, _TOP_DEFAULTS, [])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(created)
            raise

    async def _add_child(
        self, parent: Node, name: str, options: Mapping[str, Any] | str, role: Role
    ) -> Child:
        if name in parent.children:
            raise GraphError.at(parent.name, name, "the node already has this child")
        created: list[Node] = []
        try:
            if isinstance(options, str):
                child = self._reference(parent.name, name, options, [parent.name])
            else:
                child = await self._open_node(
                    options, created, _child_defaults(parent, role), [parent.name]
                )
            edge = Child(child, parent=parent, name=name, role=role)
            self._transaction({edge: child})
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(created)
            raise
        if parent.opened:
            parent.refresh()
        return edge

    async def _open_node(
        self,
        options: Mapping[str, Any],
        created: list[Node],
        defaults: Mapping[str, Any],
        building: list[str],
    ) -> Node:
        if not isinstance(options, Mapping):
            raise GraphError(f"node options must be a dict, got {options!r}")
        opts = unflatten(options)
        name = opts.pop("node-name", None)
        if name is None:
            self._auto_names += 1
            name = f"#block{self._auto_names:03d}"
        elif not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraphError(
                f"invalid node-name {name!r}: a letter, then up to 30 letters, digits, "
                "'-', '_' or '.'"
            )
        elif name in self._nodes:
            raise GraphError(f"duplicate node-name '{name}'")
        if "driver" not in opts:
            raise GraphError.at(name, "driver", "missing (which driver should open this node?)")
        driver_name = opts.pop("driver")
        if not isinstance(driver_name, str):
            raise GraphError.at(name, "driver", f"expected a driver name, got {driver_name!r}")
        try:
            cls = load_driver(driver_name)
        except GraphError as exc:
            raise GraphError.at(name, "driver", str(exc)) from None
        generic = _generic_options(name, opts, defaults)
        child_opts = {key: opts.pop(key) for key in list(opts) if key in cls.children}
        typed = _driver_options(name, cls, opts)

        node = Node(self, name, driver_name, **generic)
        node.driver = cls(node, typed)
        self._nodes[name] = node
        created.append(node)
        edges: dict[Child, Node] = {}
        for key, spec in cls.children.items():
            if key not in child_opts:
                if spec.required:
                    raise GraphError.at(name, key, "missing (this driver needs the child)")
                continue
            value = child_opts[key]
            if value is None:
                if spec.required:
                    raise GraphError.at(name, key, "cannot be null: this driver needs the child")
                node.null_children.add(key)
                continue
            if isinstance(value, str):
                child = self._reference(name, key, value, [*building, name])
            elif isinstance(value, Mapping):
                child = await self._open_node(
                    value, created, _child_defaults(node, spec.role), [*building, name]
                )
            else:
                raise GraphError.at(
                    name, key, f"expected a node-name or a dict of options, got {value!r}"
                )
            edges[Child(child, parent=node, name=key, role=spec.role)] = child
        self._transaction(edges)
        try:
            await node.driver.open()
        except GraphError:
            raise
        except OSError as exc:
            raise GraphError.at(name, None, f"cannot open ({driver_name}): {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise GraphError.at(name, None, f"cannot open ({driver_name}): {exc}") from exc
        node.refresh()
        node.opened = True
        return node

    def _reference(self, node: str, key: str, ref: str, building: list[str]) -> Node:
        if ref in building:
            raise GraphError.at(node, key, f"'{ref}' would create a cycle")
        target = self._nodes.get(ref)
        if target is None or not target.opened:
            raise GraphError.at(node, key, f"no node named '{ref}'")
        return target

    async def _discard(self, created: list[Node]) -> None:
        """Undo a failed add: unlink and close the nodes it created, newest first."""
        for node in reversed(created):
            edges = [e for e in node.children.values() if e in e.node.parents]
            if edges:
                self._unlink(edges)
            node.children.clear()
            if node.opened:
                node.opened = False
                with contextlib.suppress(OSError):
                    await node.driver.close()
            self._nodes.pop(node.name, None)

    def _unlink(self, edges: list[Child]) -> None:
        """Drop edges; loosening permissions cannot conflict, so this always applies."""
        try:
            self._transaction(dict.fromkeys(edges))
        except GraphError:
            for edge in edges:
                if edge in edge.node.parents:
                    edge.node.parents.remove(edge)

    # -- users and edits ------------------------------------------------------------------
    def attach(
        self,
        node_name: str,
        perm: Perm = Perm.CONSISTENT_READ,
        shared: Perm = Perm.ALL,
        user: str | None = None,
    ) -> Child:
        """A root edge to ``node_name`` holding ``perm`` and sharing ``shared`` (as QEMU's
        BlockBackend): every request of this user goes through it."""
        node = self.node(node_name)
        if not node.opened:
            raise GraphError(f"node '{node_name}' is not open")
        edge = Child(node, perm=perm, shared=shared, user=user or f"user of '{node_name}'")
        self._transaction({edge: node})
        return edge

    def _detach(self, edge: Child) -> None:
        if edge not in edge.node.parents:
            return
        self._transaction({edge: None})

    def replace_node(self, old_name: str, new_name: str) -> None:
        """Move every user and parent of ``old_name`` over to ``new_name`` (edges from
        ``new_name`` itself stay, so a filter can be inserted above a node)."""
        old, new = self.node(old_name), self.node(new_name)
        if old is new:
            return
        changes: dict[Child, Node | None] = {e: new for e in old.parents if e.parent is not new}
        self._transaction(changes)
        for parent in {e.parent for e in changes if e.parent is not None}:
            for above in self._nodes_above(parent):
                above.refresh()

    async def remove(self, node_name: str) -> None:
        """Close a node nobody uses. Children it opened inline (auto-named ``#...``) go with
        it once unused; named children stay in the graph."""
        node = self.node(node_name)
        if node.parents:
            users = ", ".join(e.user for e in node.parents)
            raise GraphError(f"node '{node_name}' is in use by {users}")
        below = [e.node for e in node.children.values()]
        self._unlink(list(node.children.values()))
        node.children.clear()
        del self._nodes[node_name]
        if node.opened:
            node.opened = False
            await node.driver.close()
        for child in below:
            if child.name.startswith("#") and not child.parents and child.name in self._nodes:
                await self.remove(child.name)

    async def close(self) -> None:
        """Flush and close every node, parents before children. Raises the first error
        after closing everything."""
        from .io import flush_node

        order = plan(self._nodes.values(), self._edges()).order
        error: BaseException | None = None
        for node in order:
            if node.opened:
                try:
                    await flush_node(node)
                except OSError as exc:
                    error = error or exc
        for node in order:
            if node.opened:
                node.opened = False
                try:
                    await node.driver.close()
                except OSError as exc:
                    error = error or exc
        for node in order:
            for edge in node.parents:
                edge._set_perm(Perm.NONE, Perm.ALL)
            node.parents.clear()
            node.children.clear()
        self._nodes.clear()
        if error is not None:
            raise error

    # -- transactions ---------------------------------------------------------------------
    def _edges(self) -> dict[Child, Node]:
        return {edge: node for node in self._nodes.values() for edge in node.parents}

    def _transaction(self, changes: Mapping[Child, Node | None]) -> None:
        """Apply edge changes (edge -> new target, None = remove) as one transaction:
        plan the whole candidate graph, let drivers check their new permissions, then
        commit everything -- or raise GraphError having changed nothing."""
        targets = self._edges()
        for edge, target in changes.items():
            if target is None:
                targets.pop(edge, None)
            else:
                targets[edge] = target
        result = plan(self._nodes.values(), targets)
        checked: list[Node] = []
        for node in result.order:
            new = result.node_perms[node]
            if node.opened and new != (node.perm, node.shared):
                try:
                    node.driver.check_perm(*new)
                except (OSError, GraphError) as exc:
                    # The refusing driver took nothing; the ones before it undo theirs.
                    for done in checked:
                        done.driver.abort_perm()
                    if isinstance(exc, GraphError):
                        raise
                    raise GraphError.at(node.name, None, f"cannot take permissions: {exc}") from exc
                checked.append(node)
        # Commit: nothing below can fail.
        for edge, target in changes.items():
            if edge in edge.node.parents:
                edge.node.parents.remove(edge)
            if target is None:
                if edge.parent is not None and edge.parent.children.get(edge.name) is edge:
                    del edge.parent.children[edge.name]
                edge._set_perm(Perm.NONE, Perm.ALL)
            else:
                edge.node = target
                target.parents.append(edge)
                if edge.parent is not None:
                    edge.parent.children[edge.name] = edge
        for edge, (use, share) in result.edge_perms.items():
            if (edge.perm, edge.shared) != (use, share) or edge in changes:
                edge._set_perm(use, share)
        for node in checked:
            node.perm, node.shared = result.node_perms[node]
            node.driver.set_perm(node.perm, node.shared)
        for node, (use, share) in result.node_perms.items():
            node.perm, node.shared = use, share

    def _nodes_above(self, node: Node) -> list[Node]:
        """``node`` and every node above it, children first: after a resize their cached
        sizes (a filter's, a raw window's without ``size``) are refreshed in this order."""
        out = [node]
        for n in out:  # grows while iterating: a breadth-first walk upwards
            for edge in n.parents:
                parent = edge.parent
                if parent is not None and parent.opened and parent not in out:
                    out.append(parent)
        return out


# -- option helpers ------------------------------------------------------------------------

_TOP_DEFAULTS: Mapping[str, Any] = {
    "read_only": False,
    "discard": "ignore",
    "detect_zeroes": "off",
    "cache_direct": False,
    "cache_no_flush": False,
    "copy_on_read": False,
}


def _child_defaults(parent: Node, role: Role) -> dict[str, Any]:
    """Options a child opened inline inherits (as QEMU's bdrv_inherited_options): the cache
    mode; read-only unless it is a backing file, which defaults to read-only; and
    ``discard=unmap``, because the top node's policy is the gate."""
    return {
        "read_only": True if role is Role.BACKING else parent.read_only,
        "discard": "unmap",
        "detect_zeroes": "off",
        "cache_direct": parent.cache_direct,
        "cache_no_flush": parent.cache_no_flush,
        "copy_on_read": False,  # a top-only option, as in qemu
    }


def _generic_options(
    name: str, opts: dict[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    out = dict(defaults)
    try:
        key = "read-only"
        if key in opts:
            out["read_only"] = parse_bool(opts.pop(key))
        key = "discard"
        if key in opts:
            value = opts.pop(key)
            if value not in _DISCARD:
                raise ValueError(f"expected ignore or unmap, got {value!r}")
            out["discard"] = _DISCARD[value]
        key = "copy-on-read"
        if key in opts:
            out["copy_on_read"] = parse_bool(opts.pop(key))
        key = "detect-zeroes"
        if key in opts:
            value = opts.pop(key)
            if value not in _DETECT_ZEROES:
                raise ValueError(f"expected off, on or unmap, got {value!r}")
            out["detect_zeroes"] = value
        if "cache" in opts:
            cache = opts.pop("cache")
            if not isinstance(cache, Mapping):
                key = "cache"
                raise ValueError(f"expected cache.direct / cache.no-flush, got {cache!r}")
            cache = dict(cache)
            key = "cache.direct"
            if "direct" in cache:
                out["cache_direct"] = parse_bool(cache.pop("direct"))
            key = "cache.no-flush"
            if "no-flush" in cache:
                out["cache_no_flush"] = parse_bool(cache.pop("no-flush"))
            if cache:
                key = f"cache.{next(iter(cache))}"
                raise ValueError("unknown option")
    except ValueError as exc:
        raise GraphError.at(name, key, str(exc)) from None
    if out["detect_zeroes"] == "unmap" and out["discard"] != "unmap":
        raise GraphError.at(name, "detect-zeroes", "'unmap' needs discard=unmap")
    if out["copy_on_read"] and out["read_only"]:
        raise GraphError.at(name, "copy-on-read", "a read-only node cannot copy data into itself")
    return out


def _driver_options(name: str, cls: type[Driver], opts: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for key, opt in cls.options.items():
        if key in opts:
            try:
                typed[key] = coerce(opt, opts.pop(key))
            except ValueError as exc:
                raise GraphError.at(name, key, str(exc)) from None
        elif opt.required:
            raise GraphError.at(name, key, f"missing (required by driver '{cls.name}')")
        else:
            typed[key] = opt.default
    if opts:
        key = next(iter(opts))
        known = sorted(set(cls.options) | set(cls.children) | _GENERIC)
        raise GraphError.at(
            name, key, f"unknown option for driver '{cls.name}' (known: {', '.join(known)})"
        )
    return typed
