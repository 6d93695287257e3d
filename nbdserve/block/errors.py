"""The block layer's configuration error."""

from __future__ import annotations


class GraphError(ValueError):
    """Bad options, an unknown driver or node, a missing file, a duplicate node-name, a cycle
    or a permission conflict. The message names the node and the key (or both users)."""

    @classmethod
    def at(cls, node: str, key: str | None, message: str) -> GraphError:
        where = f"node '{node}'" if key is None else f"node '{node}', option '{key}'"
        return cls(f"{where}: {message}")
