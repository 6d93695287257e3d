"""The driver interface: what one node's implementation provides.

A driver implements only the callbacks it has; the generic request path (``io.py``) does the
rest: bounds checks, alignment padding and read-modify-write, splitting at ``max_transfer``,
FUA emulation by flush, zero-write fallback, discard policy, statistics. By the time a
callback runs its arguments are valid: inside the node, aligned to
``limits.request_alignment`` and no longer than ``limits.max_transfer``. (If the node's size
is not a multiple of the alignment, the last block may run past the end: a read there
returns the bytes that exist, the generic layer zero-fills the rest; a write's bytes past
the end are padding.)

Errors are raised as ``OSError(errno, message)``; the caller of the block layer maps errno.

A driver reaches its children through ``self.node.children[name]`` (a :class:`Child` edge with
the same async ``read``/``write``/``zero``/``discard``/``flush``/``block_status`` methods a user
has), or the shortcuts :attr:`file` and :attr:`backing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .types import Buffer, Extent, Limits, Perm, ReqFlags, Role

if TYPE_CHECKING:
    from .io import Unlocker
    from .node import Child, Node

_REQUIRED: Any = object()


@dataclass(frozen=True, slots=True)
class Opt:
    """One option a driver accepts.

    ``kind`` is ``str``, ``int``, ``bool``, ``"size"`` (an int, or a string with a K/M/G/T
    suffix) or a tuple of allowed strings. ``default`` left out means the option is required.
    """

    kind: Any
    default: Any = _REQUIRED
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child edge a driver takes: its role and whether it must be given."""

    role: Role
    required: bool = True


class Driver:
    """Base class of every driver. One instance per node."""

    #: Registry key (``"driver": name`` in the options).
    name: ClassVar[str] = ""
    #: Options this driver accepts, besides the generic ones every node has
    #: (node-name, read-only, discard, detect-zeroes, cache.*).
    options: ClassVar[Mapping[str, Opt]] = {}
    #: Child edges this driver takes, by option name (``"file"``, ``"backing"``, ...).
    children: ClassVar[Mapping[str, ChildSpec]] = {}
    #: A filter passes every callback it does not define to its only child.
    is_filter: ClassVar[bool] = False

    #: Set in ``open()``; the generic layer reads these, they are not per-request calls.
    limits: Limits = Limits()
    #: Flags ``write()`` honours itself (FUA); others are emulated or dropped by the generic layer.
    supported_write_flags: ReqFlags = ReqFlags.NONE
    #: Flags ``zero()`` honours (FUA, MAY_UNMAP, NO_FALLBACK). NO_FALLBACK here means
    #: "zeroing is cheap": without it a fast-zero request fails with ENOTSUP at once.
    supported_zero_flags: ReqFlags = ReqFlags.NONE

    def __init__(self, node: Node, opts: Mapping[str, Any]) -> None:
        self.node = node
        self.opts = opts

    def same_offsets(self) -> Child | None:
        """A child edge holding this node's bytes at the same offsets, if the driver adds
        nothing to reads and writes that complete at once (raw without an offset). The
        generic layer then sends ``read_nowait``/``write_nowait`` straight to that edge's
        request path: one Python call less per page-cache hit. Asked again whenever the
        node's callbacks are rebound."""
        return None

    @property
    def file(self) -> Child:
        return self.node.children["file"]

    @property
    def backing(self) -> Child | None:
        return self.node.children.get("backing")

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Open the node; children are already open. Set ``limits`` and capability flags."""

    async def close(self) -> None:
        """Release resources. Called once, after the last request."""

    def length(self) -> int:
        """Current size in bytes. Cheap: keep it cached. A filter that does not define it
        has its child's size."""
        raise NotImplementedError

    # -- permissions (optional) ----------------------------------------------------------
    # Called inside a graph transaction with the node's new cumulative permissions: what its
    # users hold together (``perm``) and what they all let others do (``shared``).
    # ``check_perm`` may refuse by raising OSError or GraphError (the file driver takes its
    # byte-range locks here); then exactly one of ``set_perm`` (commit) or ``abort_perm``
    # (roll back whatever check_perm took) follows.

    def child_perms(
        self, child: str, role: Role, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm] | None:
        """What to use and share on child edge ``child``, given the node's cumulative
        ``perm``/``shared``; None (the default) applies the standard rule for ``role``
        (see ``perms.py``)."""
        return None

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Refuse (raise) if the node cannot serve these permissions."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """The transaction committed with the permissions last passed to ``check_perm``."""

    def abort_perm(self) -> None:
        """The transaction failed: undo what the last ``check_perm`` did."""

    # -- the request callbacks: define only the ones the driver has --------------------
    # read(offset, length) -> Buffer                        (async)
    # read_nowait(offset, length) -> Buffer | None          (sync: None = "would block")
    # write(offset, data, flags) -> None                    (async)
    # write_nowait(offset, data, flags) -> bool             (sync: False = "would block")
    # read_unlocked(offset, length, unlock) -> Buffer | None (sync, see below)
    # write_unlocked(offset, data, unlock) -> bool          (sync, see below)
    # read_splice(offset, length) -> (fd, offset) | None    (sync, see below)
    # zero(offset, length, flags) -> None                   (async; OSError(ENOTSUP) = "fall back")
    # discard(offset, length) -> None                       (async)
    # flush() -> None                                       (async)
    # cache(offset, length) -> None                         (async; prefetch hint)
    # block_status(offset, length) -> Extent                (async; length may run past the
    #                                                        request; generic code clamps it.
    #     A format/protocol answers for its own layer only: DATA/ZERO/OFFSET_VALID (+map_offset,
    #     file), or NONE = "not allocated here, ask the backing child". A filter answers with
    #     its child's complete answer, e.g. ``await self.file.block_status_one(off, len)``.)
    # truncate(length) -> None                              (async)
    #
    # They are looked up with getattr on the instance, so a driver that lacks one simply
    # doesn't define it.
    #
    # The two ``_nowait`` callbacks may be called from a server's connection thread instead of
    # the trio thread (nbdserve/datapath.py), always with the graph lock held, so that they
    # never run alongside a trio task. They must not call trio, and must not block for long
    # (the lock stalls every other connection meanwhile).
    #
    # The two ``_unlocked`` callbacks serve a large aligned request without flags from a
    # connection thread that holds the graph lock, as ``_nowait`` ones do, and lend an
    # ``Unlocker``: inside ``with unlock:`` the lock is let go and other connections and trio
    # tasks run, so the driver does only its copy there, touching nothing but what is safe
    # across threads (a file descriptor); buffers come from its pool before. A write may
    # block; a read must not (a cache miss is the thread pool's work). Each does the whole
    # request, raises OSError, or declines (None / False) and the generic layer takes
    # another path.
    #
    # ``read_splice`` says where a large aligned read's bytes lie in a file whose pages are
    # always in memory (tmpfs), so that a connection thread sends them with ``sendfile``
    # (no copy through Python) once it has let the lock go: a descriptor that stays open
    # while the node is, and an offset. None when they are not all there to be sent as they
    # are; a range that starts in a hole also says None, so that a sparse read still finds
    # its holes.
    #
    # Their signatures, for drivers to copy:

    if TYPE_CHECKING:

        async def read(self, offset: int, length: int) -> Buffer: ...
        def read_nowait(self, offset: int, length: int) -> Buffer | None: ...
        async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None: ...
        def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool: ...
        def read_unlocked(self, offset: int, length: int, unlock: Unlocker) -> Buffer | None: ...
        def write_unlocked(self, offset: int, data: Buffer, unlock: Unlocker) -> bool: ...
        def read_splice(self, offset: int, length: int) -> tuple[int, int] | None: ...
        async def zero(self, offset: int, length: int, flags: ReqFlags) -> None: ...
        async def discard(self, offset: int, length: int) -> None: ...
        async def flush(self) -> None: ...
        async def cache(self, offset: int, length: int) -> None: ...
        async def block_status(self, offset: int, length: int) -> Extent: ...
        async def truncate(self, length: int) -> None: ...
