"""A node of the block graph: one driver instance, its typed options and its edges."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .driver import Driver
from .errors import GraphError
from .io import Child, Unlocker
from .stats import NodeStats
from .tracking import Tracker
from .types import Buffer, Extent, Limits, Perm, ReqFlags, Role

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Caps", "Child", "Node"]

#: "No limit" for max_transfer and friends: larger than any request.
UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Caps:
    """What a user of an edge can rely on; the server derives its NBD flags from this."""

    read_only: bool
    can_flush: bool
    native_fua: bool
    #: Discard reaches a driver that frees space (discard policy ``unmap``).
    can_discard: bool
    can_zero: bool
    #: Zeroing is cheap: a NO_FALLBACK zero-write can succeed.
    can_fast_zero: bool
    can_cache: bool
    has_block_status: bool
    #: No per-connection cache: every write is visible to every user of the node.
    multi_conn_safe: bool


class Node:
    """One node: ``name``, ``driver``, generic options, ``children`` (edges down, by name) and
    ``parents`` (edges up). The request path reads the precomputed ``_*`` attributes."""

    def __init__(
        self,
        graph: Graph,
        name: str,
        driver_name: str,
        *,
        read_only: bool = False,
        discard: str = "ignore",
        detect_zeroes: str = "off",
        cache_direct: bool = False,
        cache_no_flush: bool = False,
        copy_on_read: bool = False,
    ) -> None:
        self.graph = graph
        self.name = name
        self.driver_name = driver_name
        self.driver: Driver = Driver(self, {})  # replaced before the node is used
        self.read_only = read_only
        self.discard = discard
        self.detect_zeroes = detect_zeroes
        self.cache_direct = cache_direct
        self.cache_no_flush = cache_no_flush
        #: Reads copy data supplied by the backing chain into this node.
        self.copy_on_read = copy_on_read
        self.children: dict[str, Child] = {}
        self.parents: list[Child] = []
        #: Child options given as JSON null ("no backing file", even if the image names one).
        self.null_children: set[str] = set()
        self.stats = NodeStats()
        #: Cumulative permissions of the node's users (OR of perms, AND of shared).
        self.perm = Perm.NONE
        self.shared = Perm.ALL
        self.opened = False
        self.limits = Limits()
        # Flush de-duplication: bumped by every write, remembered by every flush.
        self.write_gen = 0
        self.flushed_gen = 0
        self._flush_lock = trio.Lock()
        self._tracker = Tracker()
        self._size = 0
        self._align_mask = 0
        self._max_xfer = UNLIMITED
        #: The largest read the fast path takes: 0 sends every read down the slow path.
        self._read_max = UNLIMITED
        self._fast_write = False
        self._write_flags = ReqFlags.NONE
        self._zero_flags = ReqFlags.NONE
        self._drv_read_nowait: Callable[[int, int], Buffer | None] | None = None
        self._drv_read: Callable[[int, int], Awaitable[Buffer]] | None = None
        self._drv_write_nowait: Callable[[int, Buffer, ReqFlags], bool] | None = None
        self._drv_write: Callable[[int, Buffer, ReqFlags], Awaitable[None]] | None = None
        self._drv_write_unlocked: Callable[[int, Buffer, Unlocker], bool] | None = None
        self._drv_read_unlocked: Callable[[int, int, Unlocker], Buffer | None] | None = None
        self._drv_read_splice: Callable[[int, int], tuple[int, int] | None] | None = None
        self._drv_zero: Callable[[int, int, ReqFlags], Awaitable[None]] | None = None
        self._drv_discard: Callable[[int, int], Awaitable[None]] | None = None
        self._drv_flush: Callable[[], Awaitable[None]] | None = None
        self._drv_cache: Callable[[int, int], Awaitable[None]] | None = None
        self._drv_block_status: Callable[[int, int], Awaitable[Extent]] | None = None
        self._drv_truncate: Callable[[int], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name!r} driver={self.driver_name!r} size={self._size}>"

    # -- structure ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def is_filter(self) -> bool:
        return self.driver.is_filter

    @property
    def filtered(self) -> Child | None:
        """A filter's only child edge (None for other nodes)."""
        if not self.driver.is_filter:
            return None
        return next(iter(self.children.values()), None)

    @property
    def backing(self) -> Child | None:
        for edge in self.children.values():
            if edge.role is Role.BACKING:
                return edge
        return None

    @property
    def supports_backing(self) -> bool:
        return any(spec.role is Role.BACKING for spec in self.driver.children.values())

    def walk(self) -> list[Node]:
        """This node and every node below it, parents before children, each once."""
        seen: dict[Node, None] = {}

        def visit(n: Node) -> None:
            if n not in seen:
                seen[n] = None
                for edge in n.children.values():
                    visit(edge.node)

        visit(self)
        return list(seen)

    async def add_child(self, name: str, options: Mapping[str, Any] | str, role: Role) -> Child:
        """Open (or look up) a node and attach it as child ``name``: for drivers that find a
        child at open time, e.g. a backing file named in an image header."""
        return await self.graph._add_child(self, name, options, role)

    def info(self) -> dict[str, Any]:
        """A JSON-able description (like qemu's query-named-block-nodes), for logs and tools."""
        from .perms import describe

        return {
            "node-name": self.name,
            "driver": self.driver_name,
            "size": self._size,
            "read-only": self.read_only,
            "discard": self.discard,
            "detect-zeroes": self.detect_zeroes,
            "cache": {"direct": self.cache_direct, "no-flush": self.cache_no_flush},
            "copy-on-read": self.copy_on_read,
            "request-alignment": self.limits.request_alignment,
            "max-transfer": self.limits.max_transfer,
            "perm": describe(self.perm),
            "shared": describe(self.shared),
            "children": {
                name: {"node": e.node.name, "role": e.role.value, "perm": describe(e.perm)}
                for name, e in self.children.items()
            },
            "users": [e.user for e in self.parents],
            "stats": self.stats.as_dict(),
        }

    # -- request-path state ---------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute limits, size and the bound driver callbacks (after open or truncate)."""
        drv = self.driver
        lim = drv.limits
        align = lim.request_alignment
        if align < 1 or align & (align - 1) or align > 1 << 30:
            raise GraphError.at(self.name, None, f"bad request_alignment {align} from driver")
        self.limits = lim
        self._align_mask = align - 1
        max_xfer = lim.max_transfer or UNLIMITED
        self._max_xfer = max(align, max_xfer - max_xfer % align)
        self._read_max = 0 if self.copy_on_read else self._max_xfer
        filtered = self.filtered
        if type(drv).length is Driver.length and filtered is not None:
            self._size = filtered.node._size
        else:
            self._size = drv.length()
        self._write_flags = drv.supported_write_flags
        self._zero_flags = drv.supported_zero_flags
        self._fast_write = not self.read_only and self.detect_zeroes == "off"

        def bind(name: str) -> Any:
            return getattr(drv, name, None)

        self._drv_read_nowait = bind("read_nowait")
        self._drv_read = bind("read")
        self._drv_write_nowait = bind("write_nowait")
        self._drv_write = bind("write")
        self._drv_zero = bind("zero")
        self._drv_discard = bind("discard")
        self._drv_flush = bind("flush")
        self._drv_cache = bind("cache")
        self._drv_block_status = bind("block_status")
        self._drv_truncate = bind("truncate")
        self._drv_write_unlocked = bind("write_unlocked")
        self._drv_read_unlocked = bind("read_unlocked")
        self._drv_read_splice = bind("read_splice")
        if filtered is not None:
            self._bind_passthrough(filtered)
        same = drv.same_offsets()
        if same is not None:
            self._drv_read_nowait = same.read_nowait
            self._drv_write_nowait = same.write_nowait
            self._drv_write_unlocked = same.write_unlocked
            self._drv_read_unlocked = same.read_unlocked
            self._drv_read_splice = same.read_splice
        if self._drv_read is None:
            raise GraphError.at(self.name, None, f"driver '{self.driver_name}' cannot read")

    def _bind_passthrough(self, child: Child) -> None:
        """A filter's missing callbacks go straight to its child edge."""
        if self._drv_read is None:
            self._drv_read = child.read
            if self._drv_read_nowait is None:
                self._drv_read_nowait = child.read_nowait
                self._drv_read_unlocked = child.read_unlocked
                self._drv_read_splice = child.read_splice
        if self._drv_write is None:
            self._drv_write = child.write
            if self._drv_write_nowait is None:
                self._drv_write_nowait = child.write_nowait
                self._drv_write_unlocked = child.write_unlocked
            # The child's own request path honours or emulates every write flag.
            self._write_flags = ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED
        if self._drv_zero is None:
            self._drv_zero = child.zero
            self._zero_flags = ReqFlags.FUA | ReqFlags.MAY_UNMAP
            if child.node.can_fast_zero():
                self._zero_flags |= ReqFlags.NO_FALLBACK

        if self._drv_discard is None:

            async def discard(offset: int, length: int) -> None:
                await child.discard(offset, length)

            self._drv_discard = discard
        if self._drv_cache is None and child.node._drv_cache is not None:
            self._drv_cache = child.cache
        if self._drv_truncate is None and child.node._drv_truncate is not None:
            self._drv_truncate = child.truncate

    # -- capabilities ---------------------------------------------------------------------
    def native_fua(self) -> bool:
        """Writes with FUA cost no extra flush (looking through pass-through filters)."""
        filtered = self.filtered
        if filtered is not None and getattr(self.driver, "write", None) is None:
            return filtered.node.native_fua()
        return bool(self.driver.supported_write_flags & ReqFlags.FUA)

    def can_fast_zero(self) -> bool:
        return self._drv_zero is not None and bool(self._zero_flags & ReqFlags.NO_FALLBACK)

    def can_discard(self) -> bool:
        """Discard here reaches a driver that frees space."""
        if self.discard != "unmap":
            return False
        filtered = self.filtered
        if filtered is not None and getattr(self.driver, "discard", None) is None:
            return filtered.node.can_discard()
        return self._drv_discard is not None

    def can_flush(self) -> bool:
        return any(
            getattr(n.driver, "flush", None) is not None and not n.cache_no_flush
            for n in self.walk()
        )

    def has_block_status(self) -> bool:
        return any(
            getattr(n.driver, "block_status", None) is not None or n.backing is not None
            for n in self.walk()
        )

    def caps_for(self, edge_perm: Perm) -> Caps:
        read_only = self.read_only or not edge_perm & Perm.WRITE
        return Caps(
            read_only=read_only,
            can_flush=self.can_flush(),
            native_fua=self.native_fua(),
            can_discard=not read_only and self.can_discard(),
            can_zero=not read_only,
            can_fast_zero=not read_only and self.can_fast_zero(),
            can_cache=self._drv_cache is not None or self.copy_on_read,
            has_block_status=self.has_block_status(),
            multi_conn_safe=True,
        )
