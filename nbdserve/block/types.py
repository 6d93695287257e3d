"""Small value types shared by the whole block layer: permissions, request flags,
block-status bits, child roles and per-node limits. Nothing here knows about NBD."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node

#: Anything a read may return or a write may take: no copy is forced on the caller.
Buffer = bytes | bytearray | memoryview


class Perm(enum.IntFlag):
    """What a user of a node does with it (QEMU's BLK_PERM_*, minus the ones we never need)."""

    NONE = 0
    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8
    ALL = 0xF


class ReqFlags(enum.IntFlag):
    """Per-request flags passed down the request path (QEMU's BdrvRequestFlags)."""

    NONE = 0
    #: Durable on completion; the generic layer emulates it with a flush when a driver can't.
    FUA = 0x1
    #: A zero-write may deallocate; dropped unless the node's discard policy is ``unmap``.
    MAY_UNMAP = 0x2
    #: Fail with ENOTSUP instead of a slow emulation (NBD's FAST_ZERO).
    NO_FALLBACK = 0x4
    #: The write does not change what reads return; needs only WRITE_UNCHANGED permission.
    WRITE_UNCHANGED = 0x8


class Status(enum.IntFlag):
    """Block-status bits, with the meaning of QEMU's block.h truth table."""

    NONE = 0
    #: Allocation for the data is tied to this layer.
    DATA = 0x1
    #: The range reads as zeros.
    ZERO = 0x2
    #: ``map_offset`` and ``file`` say where the raw bytes live.
    OFFSET_VALID = 0x4
    #: Content is decided at this layer, not by a backing layer (set by the generic code).
    ALLOCATED = 0x8
    #: The extent reaches the end of the node (set by the generic code).
    EOF = 0x10


class Role(enum.Enum):
    """What an edge means to its parent."""

    FILE = "file"  # a format's storage (also used for a separate data file)
    BACKING = "backing"  # copy-on-write source: unallocated ranges read through it
    FILTERED = "filtered"  # a filter's only child: everything passes through
    PRIMARY = "primary"  # a user's root edge (an export, a test)


@dataclass(frozen=True, slots=True)
class Limits:
    """A node's alignment and size limits, in bytes. 0 means "no limit" / "no preference"."""

    request_alignment: int = 1
    max_transfer: int = 0
    opt_transfer: int = 0
    discard_alignment: int = 0
    max_discard: int = 0
    zero_alignment: int = 0
    max_zero: int = 0


@dataclass(frozen=True, slots=True)
class Extent:
    """One answer of block status: ``length`` bytes starting where the query started."""

    length: int
    status: Status
    map_offset: int | None = None
    file: Node | None = None
    #: Backing-chain depth supplying the data (1 = this node, 2 = its backing, 0 = nowhere).
    depth: int = 0
