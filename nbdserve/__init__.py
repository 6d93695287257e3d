"""nbdserve: an NBD server backed by a QEMU-style block graph.

Embedding: describe the graph, the exports and where to listen in a :class:`ServerConfig`,
then ``await serve_config(config)`` inside trio (it returns when the server stops). The
block layer alone is :mod:`nbdserve.block` (``open_graph``, ``Graph.attach``, ``Child``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ExportSpec", "ListenSpec", "ServerConfig", "__version__", "serve_config"]

if TYPE_CHECKING:
    from .app import serve_config
    from .config import ExportSpec, ListenSpec, ServerConfig

# Loaded on first use, so `nbdserve --help` and argument errors don't pay for trio and the
# block layer.
_LAZY = {"serve_config": "app", "ExportSpec": "config", "ListenSpec": "config",
         "ServerConfig": "config"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdserve' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
