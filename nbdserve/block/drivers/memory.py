"""``memory``: a sparse disk in RAM, optionally a copy-on-write overlay over a backing node.

Options: ``size`` (required unless a backing node gives it). Data lives in 64 KiB pages
allocated on first write; unwritten pages are holes that read as zeros and that block status
reports as unallocated. Zeroing and discarding whole pages frees them.

With a ``backing`` child the node is an overlay: unwritten pages read through to the
backing node (zeros past its end), a partial write first copies the page up, and a zeroed
page is remembered as "allocated, reads as zeros" so the backing data stays hidden. Nothing
is ever written to the backing node. Discard in an overlay makes whole pages unallocated
again, so they read through to the backing node.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..buffers import BufferPool
from ..driver import ChildSpec, Driver, Opt
from ..errors import GraphError
from ..types import Buffer, Extent, ReqFlags, Role, Status
from ..zeros import zeros

__all__ = ["PAGE_SIZE", "MemoryDriver"]

PAGE_SHIFT = 16
PAGE_SIZE = 1 << PAGE_SHIFT
_PAGE_MASK = PAGE_SIZE - 1
#: Pages examined per block-status answer before looking only at allocated pages.
_SCAN_LIMIT = 4096


class MemoryDriver(Driver):
    name = "memory"
    options: ClassVar[dict[str, Opt]] = {
        "size": Opt("size", None, "disk size (default: the backing node's size)"),
    }
    children: ClassVar[dict[str, ChildSpec]] = {
        "backing": ChildSpec(Role.BACKING, required=False),
    }
    # Nothing to make durable: FUA is free, and zeroing is page bookkeeping.
    supported_write_flags = ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED
    supported_zero_flags = ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        self._pages: dict[int, bytearray] = {}
        #: Overlay pages that are allocated here and read as zeros.
        self._zeroed: set[int] = set()
        self._size = 0
        # Reads that span pages are assembled in recycled buffers: a fresh 1 MiB bytearray
        # costs a page fault per 4 KiB on first touch (65 % of a 1 MiB read's time).
        self._pool = BufferPool()

    async def open(self) -> None:
        size = self.opts["size"]
        backing = self.backing
        if size is None:
            if backing is None:
                raise GraphError.at(
                    self.node.name, "size", "missing (no backing node to copy it from)"
                )
            size = backing.size
        self._size = size

    def length(self) -> int:
        return self._size

    @property
    def allocated_bytes(self) -> int:
        """RAM held for data pages."""
        return len(self._pages) * PAGE_SIZE

    # -- read -----------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        off = offset & _PAGE_MASK
        if off + length <= PAGE_SIZE:
            idx = offset >> PAGE_SHIFT
            page = self._pages.get(idx)
            if page is not None:
                return page[off : off + length]
            if self.backing is None or idx in self._zeroed:
                return zeros(length)
        out = self._pool.take(length)
        for start, n in self._fill(offset, length, out):
            data = self._backing_read_nowait(start, n)
            if data is None:
                return None
            out[start - offset : start - offset + n] = data
        return out

    async def read(self, offset: int, length: int) -> Buffer:
        out = self._pool.take(length)
        for start, n in self._fill(offset, length, out):
            out[start - offset : start - offset + n] = await self._backing_read(start, n)
        return out

    def _fill(self, offset: int, length: int, out: memoryview) -> list[tuple[int, int]]:
        """Copy this layer's pages into ``out`` and zeros where this layer reads as zeros;
        return the runs to read from backing."""
        pages = self._pages
        has_backing = self.backing is not None
        todo: list[tuple[int, int]] = []
        pos = offset
        end = offset + length
        while pos < end:
            idx = pos >> PAGE_SHIFT
            off = pos & _PAGE_MASK
            n = min(PAGE_SIZE - off, end - pos)
            page = pages.get(idx)
            if page is not None:  # view to view: one memcpy (slicing the page copies)
                with memoryview(page) as src:
                    out[pos - offset : pos - offset + n] = src[off : off + n]
            elif has_backing and idx not in self._zeroed:
                if todo and todo[-1][0] + todo[-1][1] == pos:
                    todo[-1] = (todo[-1][0], todo[-1][1] + n)
                else:
                    todo.append((pos, n))
            else:  # the buffer is recycled: holes are zeroed here
                out[pos - offset : pos - offset + n] = zeros(n)
            pos += n
        return todo

    def _backing_clamp(self, offset: int, length: int) -> int:
        backing = self.backing
        assert backing is not None
        return max(0, min(length, backing.size - offset))

    def _backing_read_nowait(self, offset: int, length: int) -> Buffer | None:
        n = self._backing_clamp(offset, length)
        if n == 0:
            return zeros(length)
        data = self.backing.read_nowait(offset, n)  # type: ignore[union-attr]
        if data is None or n == length:
            return data
        return bytes(data) + bytes(length - n)

    async def _backing_read(self, offset: int, length: int) -> Buffer:
        n = self._backing_clamp(offset, length)
        if n == 0:
            return zeros(length)
        data = await self.backing.read(offset, n)  # type: ignore[union-attr]
        return data if n == length else bytes(data) + bytes(length - n)

    # -- write ----------------------------------------------------------------------------
    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        length = len(data)
        off = offset & _PAGE_MASK
        if off + length <= PAGE_SIZE:
            page = self._pages.get(offset >> PAGE_SHIFT)
            if page is not None:
                # Through a memoryview: bytearray slice assignment copies non-bytearrays twice.
                memoryview(page)[off : off + length] = data
                return True
        copies = {}
        for idx in self._copy_up_pages(offset, length):
            page_data = self._backing_read_nowait(idx << PAGE_SHIFT, PAGE_SIZE)
            if page_data is None:
                return False
            copies[idx] = page_data
        self._write(offset, data, copies)
        return True

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        copies = {}
        for idx in self._copy_up_pages(offset, len(data)):
            copies[idx] = await self._backing_read(idx << PAGE_SHIFT, PAGE_SIZE)
        self._write(offset, data, copies)

    def _copy_up_pages(self, offset: int, length: int) -> list[int]:
        """Pages partly written here that must first be copied up from backing."""
        if self.backing is None:
            return []
        out = []
        end = offset + length
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        for idx, partial in (
            (first, offset & _PAGE_MASK or (first == last and end & _PAGE_MASK)),
            (last, end & _PAGE_MASK),
        ):
            if partial and idx not in self._pages and idx not in self._zeroed and idx not in out:
                out.append(idx)
        return out

    def _write(self, offset: int, data: Buffer, copies: dict[int, Buffer]) -> None:
        pages = self._pages
        view = memoryview(data)
        pos = 0
        length = len(view)
        while pos < length:
            idx = (offset + pos) >> PAGE_SHIFT
            off = (offset + pos) & _PAGE_MASK
            n = min(PAGE_SIZE - off, length - pos)
            page = pages.get(idx)
            if page is None:
                base = copies.get(idx)
                page = bytearray(base) if base is not None else bytearray(PAGE_SIZE)
                pages[idx] = page
                self._zeroed.discard(idx)
            memoryview(page)[off : off + n] = view[pos : pos + n]
            pos += n

    # -- zero and discard -----------------------------------------------------------------
    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._clear(offset, length, keep_hidden=True)

    async def discard(self, offset: int, length: int) -> None:
        await self._clear(offset, length, keep_hidden=False)

    async def _clear(self, offset: int, length: int, keep_hidden: bool) -> None:
        """Zero the range, freeing whole pages. In an overlay a whole page becomes "zeroed"
        (``keep_hidden``, a zero-write) or unallocated again (discard)."""
        end = offset + length
        pos = offset
        overlay = self.backing is not None
        while pos < end:
            idx = pos >> PAGE_SHIFT
            off = pos & _PAGE_MASK
            n = min(PAGE_SIZE - off, end - pos)
            whole = n == PAGE_SIZE or (off == 0 and pos + n >= self._size)
            if whole:
                self._pages.pop(idx, None)
                if overlay and keep_hidden:
                    self._zeroed.add(idx)
                elif overlay:
                    self._zeroed.discard(idx)
            elif overlay and keep_hidden:
                await self.write(pos, zeros(n), ReqFlags.NONE)
            elif (page := self._pages.get(idx)) is not None:
                memoryview(page)[off : off + n] = zeros(n)
            pos += n

    # -- status and size ------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        idx = offset >> PAGE_SHIFT
        state = self._state(idx)
        last = (min(offset + length, self._size) - 1) >> PAGE_SHIFT
        nxt = idx + 1
        if state is Status.NONE and len(self._pages) + len(self._zeroed) < _SCAN_LIMIT:
            later = [i for i in self._pages if i > idx] + [i for i in self._zeroed if i > idx]
            nxt = min(later, default=last + 1)
        else:
            limit = min(last, idx + _SCAN_LIMIT)
            while nxt <= limit and self._state(nxt) is state:
                nxt += 1
        end = min(nxt << PAGE_SHIFT, self._size)
        return Extent(end - offset, state)

    def _state(self, idx: int) -> Status:
        if idx in self._pages:
            return Status.DATA
        if idx in self._zeroed:
            return Status.ZERO
        return Status.NONE

    async def truncate(self, length: int) -> None:
        if length < self._size:
            for idx in [i for i in self._pages if i << PAGE_SHIFT >= length]:
                del self._pages[idx]
            self._zeroed = {i for i in self._zeroed if i << PAGE_SHIFT < length}
            page = self._pages.get(length >> PAGE_SHIFT)
            if page is not None:
                off = length & _PAGE_MASK
                page[off:] = bytes(PAGE_SIZE - off)
        self._size = length
