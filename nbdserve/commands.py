"""The one place where NBD commands become block requests (qemu's nbd/server.c mapping).

Each handler runs a validated request against the export's edge and returns the reply
buffers. Block-layer errors propagate as ``OSError``; the connection turns them into NBD
errors with :func:`nbdserve.errors.nbd_errno`. The connection's synchronous fast path (page
cache reads and writes) lives in :mod:`nbdserve.connection`; everything here may await.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from protocol import Cmd, CmdFlag, Request, ServerTransmission, StateFlag

from .block import Child, Extent, ReqFlags, Status
from .exports import ALLOCATION_DEPTH, BASE_ALLOCATION, Export
from .types import Buffer

#: Structured READs at least this long may answer zeros with OFFSET_HOLE chunks (saving the
#: bandwidth); below it looking for zeros costs more than it could save. A read served at
#: once from the page cache checks its data for zeros (a memcmp, far cheaper than a
#: block-status call); a read that has to wait asks block status first. A read sent with
#: sendfile from a file in memory starts in data (connection.py): it goes out as data.
SPARSE_READ_MIN = 64 * 1024

Handler = Callable[["CommandContext", Request], Awaitable[Sequence[Buffer]]]


class CommandContext:
    """What a handler needs: the edge, the reply builder and the export's write policy."""

    __slots__ = ("child", "contexts", "structured", "tx", "writethrough")

    def __init__(self, export: Export, tx: ServerTransmission) -> None:
        self.child: Child = export.child
        self.tx = tx
        self.writethrough = export.writethrough
        self.structured = tx.session.structured
        self.contexts = dict(tx.session.contexts)

    def write_flags(self, request: Request) -> ReqFlags:
        if self.writethrough or request.flags & CmdFlag.FUA:
            return ReqFlags.FUA
        return ReqFlags.NONE


def wants_sparse_read(ctx: CommandContext, request: Request) -> bool:
    return (ctx.structured and request.length >= SPARSE_READ_MIN
            and not request.flags & CmdFlag.DF)


async def _read(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    child, tx = ctx.child, ctx.tx
    if request.flags & CmdFlag.FUA:
        await child.flush()  # qemu's extension: FUA on READ flushes first
    if not wants_sparse_read(ctx, request):
        return tx.reply_read(request, await child.read(request.offset, request.length))
    start, end = request.offset, request.offset + request.length
    pieces: list[tuple[int, Buffer] | tuple[int, int]] = []
    pos = start
    data_from = None  # start of a run of non-zero extents, read with one call
    for extent in await child.block_status(start, request.length):
        length = min(extent.length, end - pos)
        if extent.status & Status.ZERO:
            if data_from is not None:
                pieces.append((data_from, await child.read(data_from, pos - data_from)))
                data_from = None
            pieces.append((pos, length))
        elif data_from is None:
            data_from = pos
        pos += length
        if pos >= end:
            break
    if data_from is None and pos < end:
        data_from = pos
    if data_from is not None:
        pieces.append((data_from, await child.read(data_from, end - data_from)))
    if len(pieces) == 1 and not isinstance(pieces[0][1], int):
        return tx.reply_read(request, pieces[0][1])
    return tx.reply_read_chunks(request, pieces)


async def _write(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    assert request.data is not None
    await ctx.child.write(request.offset, request.data, ctx.write_flags(request))
    return [ctx.tx.reply(request)]


async def _write_zeroes(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    flags = ctx.write_flags(request)
    if not request.flags & CmdFlag.NO_HOLE:
        flags |= ReqFlags.MAY_UNMAP  # still dropped unless the node's discard policy is unmap
    if request.flags & CmdFlag.FAST_ZERO:
        flags |= ReqFlags.NO_FALLBACK
    await ctx.child.zero(request.offset, request.length, flags)
    return [ctx.tx.reply(request)]


async def _trim(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    flags = ReqFlags.FUA if request.flags & CmdFlag.FUA else ReqFlags.NONE
    await ctx.child.discard(request.offset, request.length, flags)
    return [ctx.tx.reply(request)]


async def _flush(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    await ctx.child.flush()
    return [ctx.tx.reply(request)]


async def _cache(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    await ctx.child.cache(request.offset, request.length)
    return [ctx.tx.reply(request)]


def _merge(items: list[tuple[int, int]], length: int, flags: int) -> None:
    if items and items[-1][1] == flags:
        items[-1] = (items[-1][0] + length, flags)
    else:
        items.append((length, flags))


def allocation_extents(extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """base:allocation: HOLE where the data is not allocated here, ZERO where it reads as
    zeros (qemu: NBD_STATE_HOLE unless BDRV_BLOCK_DATA)."""
    out: list[tuple[int, int]] = []
    for e in extents:
        flags = 0 if e.status & Status.DATA else StateFlag.HOLE
        if e.status & Status.ZERO:
            flags |= StateFlag.ZERO
        _merge(out, e.length, int(flags))
    return out


def depth_extents(extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """qemu:allocation-depth: 0 unallocated, 1 this node, 2 its backing, ..."""
    out: list[tuple[int, int]] = []
    for e in extents:
        _merge(out, e.length, e.depth)
    return out


async def _block_status(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
    child = ctx.child
    answer: dict[int, list[tuple[int, int]]] = {}
    for context_id, name in ctx.contexts.items():
        if name == BASE_ALLOCATION:
            answer[context_id] = allocation_extents(
                await child.block_status(request.offset, request.length))
        elif name == ALLOCATION_DEPTH:
            answer[context_id] = depth_extents(
                await child.allocation_depth(request.offset, request.length))
        else:  # pragma: no cover - exports only offer the contexts above
            raise OSError(22, f"meta context {name!r} is not served")
    return [ctx.tx.reply_block_status(request, answer)]


#: NBD command → handler. DISC has none: the connection ends after in-flight requests.
HANDLERS: dict[int, Handler] = {
    Cmd.READ: _read,
    Cmd.WRITE: _write,
    Cmd.WRITE_ZEROES: _write_zeroes,
    Cmd.TRIM: _trim,
    Cmd.FLUSH: _flush,
    Cmd.CACHE: _cache,
    Cmd.BLOCK_STATUS: _block_status,
}
