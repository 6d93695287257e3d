"""Refcount table, refcount blocks and the host-cluster allocator.

Every change is written through to the image before the caller goes on, so the caller can
order its writes for crash safety: a refcount is raised before anything points at the
cluster, and dropped only after the last pointer to it is gone. A crash in between leaves a
leaked cluster (refcount without a reference), never a reference without a refcount.

All methods that change state must be called under the driver's metadata lock.
"""

from __future__ import annotations

import heapq
import struct
from array import array
from collections import OrderedDict
from typing import Protocol

from ..types import Buffer
from .tables import OFFSET_MASK, decode_table, encode_entries


class Storage(Protocol):
    """What the allocator needs of the image file (a block-layer ``Child``)."""

    async def read(self, offset: int, length: int) -> Buffer: ...

    async def write(self, offset: int, data: Buffer) -> None: ...


class HeaderWriter(Protocol):
    async def __call__(self, table_offset: int, table_clusters: int) -> None: ...


class FileGrower(Protocol):
    async def __call__(self, min_size: int) -> None: ...


class RefcountError(OSError):
    pass


class Refcounts:
    """Refcounts of host clusters, with ``refcount_bits`` of 1 to 64 bits per entry."""

    def __init__(
        self,
        storage: Storage,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        file_size: int,
        set_table_location: HeaderWriter,
        grow_file: FileGrower,
        block_cache_size: int = 64,
    ) -> None:
        self._io = storage
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        #: Refcount entries per refcount block.
        self.per_block = self.cluster_size * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table: array[int] = array("Q")
        self._set_table_location = set_table_location
        self._grow_file = grow_file
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._block_cache_size = block_cache_size
        #: Next never-used host cluster index (the end of the file, in clusters).
        self.end = -(-file_size // self.cluster_size)
        #: Host clusters freed in this session and reusable (min-heap of indices)...
        self._free: list[int] = []
        #: ...and freed but not yet handed back by the driver (a read may still use them).
        self._freed: list[int] = []
        #: The last allocation came from the never-written end of the file (reads as zeros).
        self.last_fresh = False

    async def load(self) -> None:
        raw = await self._io.read(self.table_offset, self.table_clusters * self.cluster_size)
        self.table = decode_table(raw)
        for ti, entry in enumerate(self.table):
            off = entry & OFFSET_MASK
            if entry & ~OFFSET_MASK or off % self.cluster_size:
                raise RefcountError(5, f"refcount table entry {ti} is invalid ({entry:#x})")
            # Metadata beyond the end of the file would be allocated over: count it in.
            self.end = max(self.end, (off >> self.cluster_bits) + 1)

    # -- entry access -------------------------------------------------------------------
    def _get_entry(self, block: bytearray, idx: int) -> int:
        bits = self.bits
        if bits >= 8:
            nbytes = bits >> 3
            return int.from_bytes(block[idx * nbytes : (idx + 1) * nbytes], "big")
        per_byte = 8 // bits
        byte = block[idx // per_byte]
        return (byte >> ((idx % per_byte) * bits)) & ((1 << bits) - 1)

    def _set_entry(self, block: bytearray, idx: int, value: int) -> tuple[int, bytes]:
        """Set one entry; return (byte offset in block, bytes to write back)."""
        bits = self.bits
        if bits >= 8:
            nbytes = bits >> 3
            raw = value.to_bytes(nbytes, "big")
            block[idx * nbytes : (idx + 1) * nbytes] = raw
            return idx * nbytes, raw
        per_byte = 8 // bits
        pos = idx // per_byte
        shift = (idx % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        block[pos] = (block[pos] & ~mask) | (value << shift)
        return pos, bytes(block[pos : pos + 1])

    async def _block(self, block_offset: int) -> bytearray:
        block = self._blocks.get(block_offset)
        if block is None:
            block = bytearray(await self._io.read(block_offset, self.cluster_size))
            self._blocks[block_offset] = block
            while len(self._blocks) > self._block_cache_size:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block_offset)
        return block

    async def get(self, cluster: int) -> int:
        ti, idx = divmod(cluster, self.per_block)
        if ti >= len(self.table) or not self.table[ti]:
            return 0
        return self._get_entry(await self._block(self.table[ti] & OFFSET_MASK), idx)

    async def add(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of clusters ``first .. first+count-1``.

        Writes each touched refcount block back with one write. A count dropping to zero
        makes the cluster reusable (see :meth:`release`).
        """
        cluster = first
        stop = first + count
        while cluster < stop:
            ti, idx = divmod(cluster, self.per_block)
            await self._ensure_block(ti)
            block_off = self.table[ti] & OFFSET_MASK
            block = await self._block(block_off)
            n = min(stop - cluster, self.per_block - idx)
            lo = hi = -1
            for i in range(idx, idx + n):
                value = self._get_entry(block, i) + delta
                if value < 0 or value > self.max_refcount:
                    raise RefcountError(
                        5, f"refcount of host cluster {cluster + i - idx} would become {value}"
                    )
                pos, raw = self._set_entry(block, i, value)
                lo = pos if lo < 0 else lo
                hi = pos + len(raw)
                if value == 0:
                    self._freed.append(cluster + i - idx)
            await self._io.write(block_off + lo, bytes(block[lo:hi]))
            cluster += n

    # -- allocation ---------------------------------------------------------------------
    async def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous host clusters; return the byte offset of the first.

        The refcounts are on disk when this returns. Single clusters reuse freed ones first;
        runs come from the end of the file, so large writes stay contiguous.
        """
        while count == 1 and self._free:
            cluster = heapq.heappop(self._free)
            if await self.get(cluster) == 0:
                await self.add(cluster, 1, 1)
                self.last_fresh = False
                return cluster << self.cluster_bits
        # Make sure the refcount blocks for the run exist before choosing it: creating a
        # block may itself take a cluster at the end.
        while True:
            start = self.end
            for ti in range(start // self.per_block, (start + count - 1) // self.per_block + 1):
                await self._ensure_block(ti)
            if start == self.end:
                break
        self.end = start + count
        await self._grow_file(self.end << self.cluster_bits)
        await self.add(start, count, 1)
        self.last_fresh = True
        return start << self.cluster_bits

    async def free(self, host_offset: int, length: int) -> None:
        """Drop one reference to every host cluster overlapping the byte range."""
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        await self.add(first, last - first + 1, -1)

    def take_free(self) -> list[int]:
        """Hand over the clusters freed since the last call; they are not reused until
        given back with :meth:`give_free`."""
        freed, self._freed = self._freed, []
        return freed

    def give_free(self, clusters: list[int]) -> None:
        for c in clusters:
            heapq.heappush(self._free, c)

    async def _ensure_block(self, ti: int) -> None:
        while ti >= len(self.table):
            await self._grow_table(ti)
        if self.table[ti]:
            return
        # Take a cluster at the end of the file for the new block. If it falls inside the
        # range the block describes, the block counts itself; otherwise the block that
        # covers it (which exists: it lies at a lower index we already ensured) does.
        cluster = self.end
        self.end += 1
        await self._grow_file(self.end << self.cluster_bits)
        block = bytearray(self.cluster_size)
        offset = cluster << self.cluster_bits
        if cluster // self.per_block == ti:
            self._set_entry(block, cluster % self.per_block, 1)
        else:
            await self.add(cluster, 1, 1)
        await self._io.write(offset, block)
        self._blocks[offset] = block
        self.table[ti] = offset
        await self._io.write(self.table_offset + ti * 8, struct.pack(">Q", offset))

    async def _grow_table(self, need_index: int) -> None:
        """Move the refcount table to a bigger place at the end of the file.

        The new table and any refcount blocks needed to describe it are written first,
        then the header is switched over in one small write, then the old table is freed.
        """
        per_cluster = self.cluster_size // 8
        new_clusters = max(self.table_clusters * 2, -(-(need_index + 1) // per_cluster))
        start = self.end
        while True:
            # Refcount blocks needed to describe the area [start, start + new_clusters + k)
            # where the k new blocks themselves sit right after the table: a fixpoint.
            new_blocks: list[int] = []
            while True:
                area_end = start + new_clusters + len(new_blocks)
                missing = [
                    ti
                    for ti in range(start // self.per_block, (area_end - 1) // self.per_block + 1)
                    if ti >= len(self.table) or not self.table[ti]
                ]
                if len(missing) <= len(new_blocks):
                    break
                new_blocks = missing
            if max(new_blocks, default=0) < new_clusters * per_cluster:
                break
            new_clusters *= 2
        area_end = start + new_clusters + len(new_blocks)
        await self._grow_file(area_end << self.cluster_bits)
        table = array("Q", self.table)
        table.extend([0] * (new_clusters * per_cluster - len(table)))
        # The new blocks, each counting the area clusters that fall in its range.
        for i, ti in enumerate(new_blocks):
            block_cluster = start + new_clusters + i
            block = bytearray(self.cluster_size)
            lo = max(start, ti * self.per_block)
            hi = min(area_end, (ti + 1) * self.per_block)
            for c in range(lo, hi):
                self._set_entry(block, c - ti * self.per_block, 1)
            off = block_cluster << self.cluster_bits
            await self._io.write(off, block)
            self._blocks[off] = block
            table[ti] = off
        # Area clusters in ranges whose blocks already exist.
        self.end = area_end
        await self._grow_file(self.end << self.cluster_bits)
        for ti in range(start // self.per_block, (area_end - 1) // self.per_block + 1):
            if ti < len(self.table) and self.table[ti]:
                lo = max(start, ti * self.per_block)
                hi = min(area_end, (ti + 1) * self.per_block)
                await self.add(lo, hi - lo, 1)
        new_offset = start << self.cluster_bits
        await self._io.write(new_offset, encode_entries(table))
        await self._set_table_location(new_offset, new_clusters)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = table, new_offset, new_clusters
        await self.free(old_offset, old_clusters * self.cluster_size)
