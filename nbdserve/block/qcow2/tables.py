"""L1/L2 entries and the bounded L2 table cache.

Tables are kept as ``array('Q')`` in native byte order: lookups on the hot path are one
index operation. Entries are written back to disk one contiguous slice at a time by the
driver (write-through), so a cached table is never dirty and eviction is free.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections import OrderedDict

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
#: Host offset bits 9..55 of L1 entries and standard L2 entries.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
#: Bits that must be zero in a standard L2 entry (1..8 and 56..61).
L2_RESERVED = 0x3F00_0000_0000_01FE
L1_RESERVED = 0x7F00_0000_0000_01FF

_NEEDS_SWAP = sys.byteorder == "little"


class Kind(enum.IntEnum):
    """What one guest cluster is, from its L2 entry."""

    UNALLOCATED = 0  # read from backing (or zeros)
    ZERO_PLAIN = 1  # reads as zeros, no host cluster
    ZERO_ALLOC = 2  # reads as zeros, host cluster preallocated
    NORMAL = 3  # data at the host offset
    COMPRESSED = 4  # deflate/zstd stream at a byte offset


def classify(entry: int) -> Kind:
    if entry & OFLAG_COMPRESSED:
        return Kind.COMPRESSED
    if entry & OFLAG_ZERO:
        return Kind.ZERO_ALLOC if entry & OFFSET_MASK else Kind.ZERO_PLAIN
    if entry & OFFSET_MASK:
        return Kind.NORMAL
    return Kind.UNALLOCATED


def decode_table(data: bytes | bytearray | memoryview) -> array[int]:
    table = array("Q")
    table.frombytes(data)
    if _NEEDS_SWAP:
        table.byteswap()
    return table


def encode_entries(values: array[int] | list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


class CompressedLayout:
    """Decoding of compressed cluster descriptors for one cluster size."""

    def __init__(self, cluster_bits: int) -> None:
        self.shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of the compressed stream, as QEMU computes it."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.shift) & self.sectors_mask) + 1
        return offset, sectors * 512 - (offset & 511)


class L2Table:
    """One cached L2 table: its host offset and entries."""

    __slots__ = ("entries", "offset")

    def __init__(self, offset: int, entries: array[int]) -> None:
        self.offset = offset
        self.entries = entries


class L2Cache:
    """An LRU of L2 tables, keyed by host offset. Bounded by ``capacity`` tables.

    The driver fills it only under its metadata lock, and changes entries only under that
    lock too, so a table is never loaded twice or reloaded stale.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("L2 cache capacity must be at least one table")
        self.capacity = capacity
        self._tables: OrderedDict[int, L2Table] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, offset: int) -> L2Table | None:
        table = self._tables.get(offset)
        if table is None:
            self.misses += 1
            return None
        self.hits += 1
        self._tables.move_to_end(offset)
        return table

    def put(self, table: L2Table) -> None:
        self._tables[table.offset] = table
        self._tables.move_to_end(table.offset)
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)

    def __len__(self) -> int:
        return len(self._tables)
