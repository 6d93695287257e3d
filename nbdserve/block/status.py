"""Block status over a node and its backing chain, with QEMU's block.h meanings.

A format or protocol driver answers for its own layer (DATA, ZERO, OFFSET_VALID, or NONE for
"ask my backing"); a filter answers with its child's complete answer. Here the generic code
adds ALLOCATED (DATA or ZERO at a layer), walks backing chains for unallocated ranges --
zeros past the end of a shorter backing layer count as allocated at that layer -- reports
ZERO for unallocated ranges of a format without backing, fills ``depth`` (1 = this node),
sets EOF, and merges adjacent extents.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .types import Extent, Status

if TYPE_CHECKING:
    from .node import Node

__all__ = ["allocation_depth", "block_status", "status_above"]

_LAYER_BITS = Status.DATA | Status.ZERO | Status.OFFSET_VALID
_HERE = Status.DATA | Status.ZERO


async def _layer(node: Node, offset: int, length: int) -> Extent:
    """One layer's answer (for a filter: its child's complete answer), clamped to
    ``1..length`` bytes at ``offset``; ``length`` is within the node."""
    fn = node._drv_block_status
    if fn is None:
        filtered = node.filtered
        if filtered is not None:
            return await status_above(filtered.node, offset, length)
        if node.children:
            return Extent(length, Status.DATA)
        return Extent(length, Status.DATA | Status.OFFSET_VALID, offset, node)
    mask = node._align_mask
    start = offset & ~mask
    end = min((offset + length + mask) & ~mask, (node._size + mask) & ~mask)
    ext = await fn(start, end - start)
    skip = offset - start
    n = min(ext.length - skip, length)
    if n <= 0:
        raise OSError(
            errno.EIO,
            f"driver of node '{node.name}' answered block status at {start} with length "
            f"{ext.length}",
        )
    mapped = ext.map_offset
    if skip and mapped is not None:
        mapped += skip
    return Extent(n, ext.status, mapped, ext.file, ext.depth)


async def status_above(node: Node, offset: int, length: int) -> Extent:
    """The first extent at ``offset`` over ``node``'s whole chain, with ALLOCATED, depth and
    EOF filled in. ``offset`` must be inside the node."""
    size = node._size
    if offset >= size:
        return Extent(0, Status.EOF)
    length = min(length, size - offset)
    ext = await _layer(node, offset, length)
    n = ext.length
    if node.driver.is_filter:
        status = ext.status & ~Status.EOF
        mapped, file, depth = ext.map_offset, ext.file, ext.depth
    else:
        status = ext.status & _LAYER_BITS
        mapped, file, depth = ext.map_offset, ext.file, 0
        if status & _HERE:
            status |= Status.ALLOCATED
            depth = 1
        elif (backing := node.backing) is not None:
            lower = backing.node
            if offset >= lower._size:
                # Past the end of a shorter backing layer: zeros, allocated at that layer.
                status, mapped, file, depth = Status.ZERO | Status.ALLOCATED, None, lower, 2
            else:
                below = await status_above(lower, offset, n)
                n = below.length
                status = below.status & ~Status.EOF
                mapped, file = below.map_offset, below.file
                depth = below.depth + 1 if below.depth else 0
        elif node.supports_backing:
            status |= Status.ZERO  # unallocated and nothing below: reads as zeros
    if not status & Status.OFFSET_VALID:
        mapped = None
    if offset + n == size:
        status |= Status.EOF
    return Extent(n, status, mapped, file, depth)


def _mergeable(last: Extent, ext: Extent, pos: int, by_depth: bool) -> bool:
    if by_depth:
        return last.depth == ext.depth
    if (last.status | Status.EOF) != (ext.status | Status.EOF):
        return False
    if last.status & Status.OFFSET_VALID:
        return (
            last.file is ext.file
            and last.map_offset is not None
            and ext.map_offset == last.map_offset + last.length
        )
    return True


async def _collect(
    node: Node, offset: int, length: int, max_extents: int, by_depth: bool
) -> list[Extent]:
    out: list[Extent] = []
    pos = offset
    end = offset + length
    while pos < end:
        ext = await status_above(node, pos, end - pos)
        if by_depth:
            status = Status.ALLOCATED if ext.depth else Status.NONE
            ext = Extent(ext.length, status | (ext.status & Status.EOF), depth=ext.depth)
        if out and _mergeable(out[-1], ext, pos, by_depth):
            last = out[-1]
            out[-1] = Extent(
                last.length + ext.length,
                (last.status & ~Status.EOF) | (ext.status & Status.EOF),
                last.map_offset,
                last.file,
                last.depth,
            )
        elif len(out) >= max_extents:
            break
        else:
            out.append(ext)
        pos += ext.length
    return out


async def block_status(node: Node, offset: int, length: int, max_extents: int) -> list[Extent]:
    return await _collect(node, offset, length, max_extents, by_depth=False)


async def allocation_depth(node: Node, offset: int, length: int, max_extents: int) -> list[Extent]:
    return await _collect(node, offset, length, max_extents, by_depth=True)
