"""The block layer: a graph of nodes, the generic request path, drivers. Knows nothing of NBD.

graph = await open_graph([{"driver": "memory", "node-name": "m0", "size": "1G"}])
child = graph.attach("m0", perm=Perm.CONSISTENT_READ | Perm.WRITE)
await child.write(0, b"hello")
await graph.close()
"""

from .driver import ChildSpec, Driver, Opt
from .drivers import DRIVERS, load_driver
from .errors import GraphError
from .graph import Graph, open_graph
from .io import Child
from .node import Caps, Node
from .options import parse_dotted, parse_size
from .stats import NodeStats
from .types import Buffer, Extent, Limits, Perm, ReqFlags, Role, Status

__all__ = [
    "DRIVERS",
    "Buffer",
    "Caps",
    "Child",
    "ChildSpec",
    "Driver",
    "Extent",
    "Graph",
    "GraphError",
    "Limits",
    "Node",
    "NodeStats",
    "Opt",
    "Perm",
    "ReqFlags",
    "Role",
    "Status",
    "load_driver",
    "open_graph",
    "parse_dotted",
    "parse_size",
]
