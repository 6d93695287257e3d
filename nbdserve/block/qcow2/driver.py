"""The qcow2 format driver.

Reads go through the L1/L2 tables (a bounded LRU of L2 tables) to the image file, to the
backing node for unallocated clusters, or decompress. Writes that land in clusters owned
by this image alone (COPIED) go in place; anything else allocates: the full new cluster is
built (copy-on-write from the old contents or the backing node), written, and only then
linked into the L2 table.

Crash safety comes from ordering, with every metadata change written through before the
next step starts: refcount raised -> data written -> L2 entry -> (L1 entry); and on the way
out, entry cleared -> refcount dropped. A process killed at any point leaves at worst
leaked clusters. The dirty bit and lazy refcounts are never used.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import trio

from ..driver import ChildSpec, Driver, Opt
from ..types import Buffer, Extent, Limits, ReqFlags, Role, Status
from .compressed import decompress_cluster
from .header import (
    OFF_AUTOCLEAR,
    OFF_REFCOUNT_TABLE,
    OFF_SIZE,
    Header,
    Qcow2FormatError,
    check_supported,
    parse_header,
)
from .locks import RangeLocks
from .refcounts import Refcounts
from .tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    CompressedLayout,
    Kind,
    L2Cache,
    L2Table,
    classify,
    decode_table,
    encode_entries,
)

if TYPE_CHECKING:
    from ..node import Node

DEFAULT_L2_CACHE = 32 << 20


@dataclass(slots=True)
class _Run:
    """A stretch of guest bytes with one way of reading them."""

    kind: Kind
    offset: int  # guest offset
    length: int
    host: int = 0  # NORMAL: host byte offset of ``offset``; COMPRESSED: the L2 entry


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


def _probe_format(path: str) -> str:
    """qcow2 if the file starts with the qcow2 magic, else raw (backing files are opened
    read-only, so guessing cannot turn a raw file's first sector into metadata)."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError as exc:
        raise Qcow2FormatError(f"cannot open backing file {path!r}: {exc.strerror}") from exc


class _Storage:
    """The image file as the allocator sees it: writes try the non-blocking path first."""

    def __init__(self, driver: Qcow2Driver) -> None:
        self.read = driver.file.read
        self.write = driver._fw


class Qcow2Driver(Driver):
    name: ClassVar[str] = "qcow2"
    options: ClassVar[Mapping[str, Opt]] = {
        "l2-cache-size": Opt(
            "size",
            DEFAULT_L2_CACHE,
            "bytes of L2 tables kept in memory (at least one table)",
        ),
    }
    children: ClassVar[Mapping[str, ChildSpec]] = {
        "file": ChildSpec(Role.FILE),
        "backing": ChildSpec(Role.BACKING, required=False),
    }

    def __init__(self, node: Node, opts: Mapping[str, Any]) -> None:
        super().__init__(node, opts)
        self.header: Header | None = None
        self._size = 0
        self._meta = trio.Lock()
        self._locks = RangeLocks()
        self._refcounts: Refcounts | None = None
        self._readers = 0
        self._pending_free: list[int] = []
        self._last_compressed: tuple[int, bytes] = (0, b"")
        self._write_prepared = False

    # -- open / close -------------------------------------------------------------------
    async def open(self) -> None:
        file = self.file
        first = bytes(await file.read(0, min(file.size, 4096)))
        if len(first) >= 24 and first[:4] == b"QFI\xfb":
            cluster_bits = int.from_bytes(first[20:24], "big")
            if 9 <= cluster_bits <= 21 and (1 << cluster_bits) > len(first):
                first = bytes(await file.read(0, min(file.size, 1 << cluster_bits)))
        h = parse_header(first)
        writable = self._writable()
        check_supported(h, writable=writable)
        self.header = h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.l2_bits = self.cb - 3
        self.l2_mask = (1 << self.l2_bits) - 1
        self.v3 = h.version >= 3
        self._size = h.size
        self._compressed = CompressedLayout(self.cb)
        if h.l1_table_offset + h.l1_size * 8 > file.size:
            raise Qcow2FormatError("L1 table lies beyond the end of the image file")
        self.l1: array[int] = (
            decode_table(await file.read(h.l1_table_offset, h.l1_size * 8))
            if h.l1_size
            else array("Q")
        )
        capacity = max(1, int(self.opts.get("l2-cache-size", DEFAULT_L2_CACHE)) // self.cs)
        self.l2cache = L2Cache(capacity)
        if writable:
            if h.refcount_table_offset + h.refcount_table_clusters * self.cs > file.size:
                raise Qcow2FormatError("refcount table lies beyond the end of the image file")
            self._refcounts = Refcounts(
                _Storage(self),
                cluster_bits=self.cb,
                refcount_order=h.refcount_order,
                table_offset=h.refcount_table_offset,
                table_clusters=h.refcount_table_clusters,
                file_size=file.size,
                set_table_location=self._set_refcount_table,
                grow_file=self._grow_file,
            )
            await self._refcounts.load()
        self.limits = Limits(
            request_alignment=1,
            opt_transfer=self.cs,
            discard_alignment=self.cs,
            zero_alignment=self.cs if self.v3 else 0,
        )
        if self.v3:
            self.supported_zero_flags = ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
        await self._open_backing(h)

    async def _open_backing(self, h: Header) -> None:
        """Open the backing file the header names, unless the user gave a ``backing``
        option (a node, or null for none). It is opened read-only, as its own node."""
        node = self.node
        if "backing" in node.children or "backing" in node.null_children:
            return
        if h.backing_file is None:
            return
        name = h.backing_file
        if name.startswith(("json:", "nbd:", "nbd+")) or "://" in name:
            raise Qcow2FormatError(f"backing file {name!r}: only local file names are supported")
        base = self._image_path()
        if not os.path.isabs(name):
            if base is None:
                raise Qcow2FormatError(
                    f"backing file {name!r} is relative, but the image has no file name to "
                    "resolve it against; give a 'backing' option"
                )
            name = os.path.join(os.path.dirname(base), name)
        fmt = h.backing_format or await trio.to_thread.run_sync(_probe_format, name)
        if fmt not in ("qcow2", "raw"):
            raise Qcow2FormatError(
                f"backing file {name!r} has format {fmt!r}; only qcow2 and raw are supported"
            )
        options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": name}}
        await node.add_child("backing", options, Role.BACKING)

    def _image_path(self) -> str | None:
        """The file name under this node (looking through filters such as blkdebug)."""
        edge: Any = self.file
        for _ in range(16):
            filename = getattr(edge.node.driver, "filename", None)
            if isinstance(filename, str):
                return filename
            edge = edge.node.filtered or edge.node.children.get("file")
            if edge is None:
                return None
        return None

    async def _grow_file(self, min_size: int) -> None:
        """Make the image file at least ``min_size`` bytes, growing in steps so that a
        run of allocations doesn't resize it every time (a resize costs a thread hop and a
        graph refresh). ``close`` trims the excess; after a crash it is a sparse tail."""
        file = self.file
        if file.size >= min_size:
            return
        step = max(32 << 20, 8 * self.cs, file.size // 8)
        await file.truncate(max(min_size, file.size + step))

    def _writable(self) -> bool:
        ro = getattr(self.node, "read_only", None)
        if ro is None:
            ro = bool(self.opts.get("read-only", False))
        return not ro

    def length(self) -> int:
        return self._size

    async def close(self) -> None:
        # Trim what _grow_file preallocated beyond the last allocated cluster.
        if self._refcounts is not None and self._write_prepared:
            used = self._refcounts.end << self.cb
            if self.file.size > used:
                await self.file.truncate(used)
        self.l2cache = L2Cache(1)

    # -- table lookup -------------------------------------------------------------------
    def _table_nowait(self, l1i: int) -> L2Table | Literal[False] | None:
        """The cached L2 table, None if unallocated, False if it must be loaded."""
        if l1i >= len(self.l1):
            return None
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return None
        table = self.l2cache.get(off)
        return False if table is None else table

    async def _table(self, l1i: int) -> L2Table | None:
        table = self._table_nowait(l1i)
        if table is False:
            async with self._meta:
                return await self._table_locked(l1i)
        return table

    async def _table_locked(self, l1i: int) -> L2Table | None:
        if l1i >= len(self.l1):
            return None
        entry = self.l1[l1i]
        off = entry & OFFSET_MASK
        if not off:
            return None
        table = self.l2cache.get(off)
        if table is None:
            if off % self.cs or entry & 0x7F00_0000_0000_01FF or off >= self.file.size:
                raise _eio(f"qcow2: corrupt L1 entry {l1i} ({entry:#x})")
            table = L2Table(off, decode_table(await self.file.read(off, self.cs)))
            self.l2cache.put(table)
        return table

    def _host(self, entry: int) -> int:
        host = entry & OFFSET_MASK
        if host & (self.cs - 1):
            raise _eio(f"qcow2: L2 entry {entry:#x} points into the middle of a cluster")
        if host >= self.file.size:
            raise _eio(f"qcow2: L2 entry {entry:#x} points past the end of the image file")
        return host

    async def _runs(self, offset: int, length: int) -> list[_Run]:
        """Split a guest range into runs that read the same way (contiguous host data,
        zeros, backing, one compressed cluster each)."""
        runs: list[_Run] = []
        end = offset + length
        pos = offset
        cs, cb = self.cs, self.cb
        while pos < end:
            c = pos >> cb
            l1i = c >> self.l2_bits
            table = await self._table(l1i)
            table_end = min(end, (l1i + 1) << (self.l2_bits + cb))
            if table is None:
                self._append(runs, Kind.UNALLOCATED, pos, table_end - pos, 0)
                pos = table_end
                continue
            entries = table.entries
            while pos < table_end:
                c = pos >> cb
                n = min(table_end, (c + 1) << cb) - pos
                entry = entries[c & self.l2_mask]
                kind = classify(entry)
                if kind is Kind.NORMAL:
                    self._append(runs, kind, pos, n, self._host(entry) + (pos & (cs - 1)))
                elif kind is Kind.COMPRESSED:
                    runs.append(_Run(kind, pos, n, entry))
                else:
                    if kind is Kind.ZERO_ALLOC:
                        kind = Kind.ZERO_PLAIN
                    self._append(runs, kind, pos, n, 0)
                pos += n
        return runs

    @staticmethod
    def _append(runs: list[_Run], kind: Kind, offset: int, length: int, host: int) -> None:
        if runs:
            last = runs[-1]
            if (
                last.kind is kind
                and kind is not Kind.COMPRESSED
                and (kind is not Kind.NORMAL or last.host + last.length == host)
            ):
                last.length += length
                return
        runs.append(_Run(kind, offset, length, host))

    # -- read ---------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        """Serve a read without awaiting when the L2 tables are cached and the range is
        one contiguous host extent (or reads as zeros); None sends the caller to ``read``."""
        cb, cs = self.cb, self.cs
        end = offset + length
        host_start = expect = -1
        zeros = from_backing = False
        backing = self.backing
        pos = offset
        while pos < end:
            cl = pos >> cb
            nxt = min(end, (cl + 1) << cb)
            table = self._table_nowait(cl >> self.l2_bits)
            if table is False:
                return None
            entry = 0 if table is None else table.entries[cl & self.l2_mask]
            kind = classify(entry)
            if kind is Kind.NORMAL:
                host = (entry & OFFSET_MASK) + (pos & (cs - 1))
                if zeros or from_backing or entry & (cs - 1) or (expect >= 0 and host != expect):
                    return None  # (a corrupt entry is reported by the async path)
                if host_start < 0:
                    host_start = host
                expect = host + nxt - pos
            elif kind is Kind.ZERO_PLAIN or kind is Kind.ZERO_ALLOC or (
                kind is Kind.UNALLOCATED and backing is None
            ):
                if host_start >= 0 or from_backing:
                    return None
                zeros = True
            elif kind is Kind.UNALLOCATED:
                if host_start >= 0 or zeros:
                    return None
                from_backing = True
            else:
                return None
            pos = nxt
        if from_backing:
            assert backing is not None
            if end > backing.size:
                return None
            return backing.read_nowait(offset, length)
        if host_start < 0:
            return bytes(length)
        if expect > self.file.size:
            return None
        return self.file.read_nowait(host_start, length)

    async def read(self, offset: int, length: int) -> Buffer:
        self._readers += 1
        try:
            runs = await self._runs(offset, length)
            if len(runs) == 1 and runs[0].kind is Kind.NORMAL:
                return await self.file.read(runs[0].host, length)
            out = bytearray(length)
            await self._fill(out, offset, runs)
            return out
        finally:
            self._readers -= 1
            if not self._readers and self._pending_free and self._refcounts:
                self._refcounts.give_free(self._pending_free)
                self._pending_free = []

    async def _fill(self, out: bytearray, base: int, runs: list[_Run]) -> None:
        view = memoryview(out)
        for run in runs:
            at = run.offset - base
            if run.kind is Kind.NORMAL:
                view[at : at + run.length] = await self.file.read(run.host, run.length)
            elif run.kind is Kind.UNALLOCATED:
                backing = self.backing
                if backing is not None:
                    n = min(run.length, backing.size - run.offset)
                    if n > 0:
                        view[at : at + n] = await backing.read(run.offset, n)
            elif run.kind is Kind.COMPRESSED:
                data = await self._decompress(run.host)
                intra = run.offset & (self.cs - 1)
                view[at : at + run.length] = data[intra : intra + run.length]
            # ZERO_PLAIN: already zeros

    async def _decompress(self, entry: int) -> bytes:
        if self._last_compressed[0] == entry:
            return self._last_compressed[1]
        offset, length = self._compressed.decode(entry)
        length = min(length, self.file.size - offset)
        if length <= 0:
            raise _eio(f"qcow2: compressed cluster at {offset:#x} is past the end of the file")
        assert self.header is not None
        data = decompress_cluster(
            await self.file.read(offset, length), self.cs, self.header.compression_type
        )
        self._last_compressed = (entry, data)
        return data

    async def _content(self, offset: int, length: int) -> bytearray:
        """Current guest contents (for copy-on-write), read like ``read`` does."""
        out = bytearray(length)
        await self._fill(out, offset, await self._runs(offset, length))
        return out

    # -- write --------------------------------------------------------------------------
    async def _fw(self, offset: int, data: Buffer) -> None:
        """Write to the image file: in the page cache at once if possible, else via a thread.
        Either way the write has completed when this returns, which the ordering needs."""
        if not self.file.write_nowait(offset, data):
            await self.file.write(offset, data)

    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        """In-place overwrite of clusters this image owns, without awaiting; False sends
        the caller to ``write`` (allocation, locked clusters, uncached tables, flags)."""
        if flags or not self._write_prepared:
            return False
        cb, cs = self.cb, self.cs
        end = offset + len(data)
        if self._locks.busy(offset >> cb, ((end - 1) >> cb) + 1):
            return False
        host_start = expect = -1
        pos = offset
        while pos < end:
            cl = pos >> cb
            nxt = min(end, (cl + 1) << cb)
            table = self._table_nowait(cl >> self.l2_bits)
            if not table:
                return False
            entry = table.entries[cl & self.l2_mask]
            if not self._in_place(entry) or entry & (cs - 1):
                return False
            host = (entry & OFFSET_MASK) + (pos & (cs - 1))
            if expect >= 0 and host != expect:
                return False
            if host_start < 0:
                host_start = host
            expect = host + nxt - pos
            pos = nxt
        return self.file.write_nowait(host_start, data)

    def _in_place(self, entry: int) -> bool:
        return entry & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_COPIED and bool(
            entry & OFFSET_MASK
        )

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        cb = self.cb
        end = offset + len(data)
        await self._prepare_write()
        async with self._locks.hold(offset >> cb, ((end - 1) >> cb) + 1):
            self._readers += 1  # our copy-on-write reads must not see clusters reused
            try:
                await self._write_locked(offset, memoryview(data).cast("B"))
            finally:
                self._readers -= 1
                self._release_frees()

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cb = self.cb
        end = offset + len(data)
        c = offset >> cb
        last = (end - 1) >> cb
        while c <= last:
            l1i = c >> self.l2_bits
            tlast = min(last, ((l1i + 1) << self.l2_bits) - 1)
            table = await self._table(l1i)
            entries = table.entries if table is not None else None
            i = c
            while i <= tlast:
                entry = entries[i & self.l2_mask] if entries is not None else 0
                j = i
                if self._in_place(entry):
                    host = self._host(entry)
                    while j < tlast and entries is not None:
                        nxt = entries[(j + 1) & self.l2_mask]
                        if not self._in_place(nxt) or nxt & OFFSET_MASK != host + (
                            (j + 1 - i) << cb
                        ):
                            break
                        j += 1
                    a = max(offset, i << cb)
                    b = min(end, (j + 1) << cb)
                    await self._fw(host + a - (i << cb), data[a - offset : b - offset])
                else:
                    while (
                        j < tlast
                        and (j + 1 - i) < 4096
                        and (entries is None or not self._in_place(entries[(j + 1) & self.l2_mask]))
                    ):
                        j += 1
                    await self._allocating_write(i, j, offset, data)
                i = j + 1
            c = tlast + 1

    async def _allocating_write(self, first: int, last: int, offset: int, data: memoryview) -> None:
        """Write guest clusters ``first..last`` (one L2 table) into newly allocated ones."""
        cb, cs = self.cb, self.cs
        n = last - first + 1
        gstart, gend = first << cb, (last + 1) << cb
        end = offset + len(data)
        a, b = max(offset, gstart), min(end, gend)
        buf: Buffer
        table = await self._table(first >> self.l2_bits)
        lo = first & self.l2_mask
        zero_source = all(
            self._reads_zero(table.entries[lo + k] if table is not None else 0) for k in range(n)
        )
        if a == gstart and b == gend:
            buf = data[a - offset : b - offset]
        elif zero_source:
            buf = b""  # decided once we know whether the new clusters already read as zeros
        else:
            out = bytearray(n * cs)
            if a > gstart or (n == 1 and b < gend):
                out[:cs] = await self._content(gstart, cs)
            if n > 1 and b < gend:
                out[(n - 1) * cs :] = await self._content(gend - cs, cs)
            out[a - gstart : b - gstart] = data[a - offset : b - offset]
            buf = out
        refcounts = await self._prepare_write()
        async with self._meta:
            host = await refcounts.allocate(n)
            if not buf:
                if refcounts.last_fresh:
                    # Never-written space at the end of the file reads as zeros: only the
                    # new data needs writing (the copy-on-write parts are zeros anyway).
                    host_at, buf = host + a - gstart, data[a - offset : b - offset]
                else:
                    out = bytearray(n * cs)
                    out[a - gstart : b - gstart] = data[a - offset : b - offset]
                    host_at, buf = host, out
            else:
                host_at = host
            # Data before the L2 entry. A write the page cache takes at once doesn't block
            # other tasks, so the common case links the cluster without a second lock trip.
            linked = self.file.write_nowait(host_at, buf)
            if linked:
                await self._link(first, n, host)
        if not linked:
            await self.file.write(host_at, buf)
            async with self._meta:
                await self._link(first, n, host)

    async def _link(self, first: int, n: int, host: int) -> None:
        """Point guest clusters ``first..first+n-1`` at new host clusters. Under _meta."""
        table = await self._writable_table(first >> self.l2_bits)
        lo = first & self.l2_mask
        old = table.entries[lo : lo + n]
        table.entries[lo : lo + n] = array(
            "Q", [(host + (k << self.cb)) | OFLAG_COPIED for k in range(n)]
        )
        await self._fw(table.offset + lo * 8, encode_entries(table.entries[lo : lo + n]))
        for entry in old:
            await self._free_entry(entry)

    def _reads_zero(self, entry: int) -> bool:
        kind = classify(entry)
        if kind is Kind.UNALLOCATED:
            return self.backing is None
        return kind is Kind.ZERO_PLAIN or kind is Kind.ZERO_ALLOC

    async def _free_entry(self, entry: int) -> None:
        """Drop this image's reference to what an old L2 entry pointed at."""
        assert self._refcounts is not None
        kind = classify(entry)
        if kind is Kind.COMPRESSED:
            offset, length = self._compressed.decode(entry)
            await self._refcounts.free(offset, length)
        elif kind is Kind.NORMAL or kind is Kind.ZERO_ALLOC:
            await self._refcounts.free(entry & OFFSET_MASK, self.cs)

    def _release_frees(self) -> None:
        """Make freed clusters reusable, but not while a read may still be using them."""
        if self._refcounts is None:
            return
        freed = self._refcounts.take_free()
        if self._readers:
            self._pending_free.extend(freed)
        else:
            self._refcounts.give_free(self._pending_free + freed)
            self._pending_free = []

    async def _prepare_write(self) -> Refcounts:
        if self._refcounts is None:
            raise OSError(errno.EPERM, "qcow2 image is open read-only")
        if not self._write_prepared:
            async with self._meta:
                h = self.header
                assert h is not None
                # Unknown or unmaintained autoclear features must be cleared before the
                # first write (spec); we maintain none of them (bitmaps included).
                if h.version >= 3 and h.autoclear_features:
                    h.autoclear_features = 0
                    await self._fw(OFF_AUTOCLEAR, bytes(8))
                self._write_prepared = True
        return self._refcounts

    async def _writable_table(self, l1i: int) -> L2Table:
        """The L2 table for ``l1i``, allocated or copied so this image owns it. Under _meta."""
        assert self._refcounts is not None and self.header is not None
        entry = self.l1[l1i]
        old = entry & OFFSET_MASK
        if old and entry & OFLAG_COPIED:
            table = await self._table_locked(l1i)
            assert table is not None
            return table
        new = await self._refcounts.allocate(1)
        if old:
            src = await self._table_locked(l1i)
            assert src is not None
            entries = array("Q", src.entries)
        else:
            entries = array("Q", bytes(self.cs))
        await self._fw(new, encode_entries(entries))
        table = L2Table(new, entries)
        self.l2cache.put(table)
        self.l1[l1i] = new | OFLAG_COPIED
        await self._fw(
            self.header.l1_table_offset + l1i * 8, struct.pack(">Q", self.l1[l1i])
        )
        if old:
            self.l2cache.drop(old)
            await self._refcounts.free(old, self.cs)
        return table

    async def flush(self) -> None:
        await self.file.flush()

    # -- zero and discard ---------------------------------------------------------------
    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """Whole clusters inside the range, as [first, stop) cluster indices. The partial
        last cluster of an image whose size is not cluster-aligned counts as whole."""
        end = offset + length
        first = (offset + self.cs - 1) >> self.cb
        stop = (end + self.cs - 1) >> self.cb if end == self._size else end >> self.cb
        return first, max(first, stop)

    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        if not self.v3:
            raise OSError(errno.ENOTSUP, "qcow2 v2 images have no zero clusters")
        await self._prepare_write()
        first, stop = self._aligned(offset, length)
        cb = self.cb
        head_end = min(offset + length, first << cb)
        tail_start = max(head_end, stop << cb)
        for a, b in ((offset, head_end), (tail_start, offset + length)):
            if b > a:
                if flags & ReqFlags.NO_FALLBACK:
                    raise OSError(errno.ENOTSUP, "unaligned zero-write would need a fallback")
                await self.write(a, bytes(b - a), ReqFlags.NONE)
        if stop > first:
            unmap = bool(flags & ReqFlags.MAY_UNMAP)
            await self._set_entries(first, stop, zero=True, unmap=unmap)

    async def discard(self, offset: int, length: int) -> None:
        await self._prepare_write()
        first, stop = self._aligned(offset, length)
        if stop > first:
            await self._set_entries(first, stop, zero=False, unmap=True)

    async def _set_entries(self, first: int, stop: int, *, zero: bool, unmap: bool) -> None:
        """Make clusters ``[first, stop)`` zero clusters (``zero``) or discard them."""
        async with self._locks.hold(first, stop):
            c = first
            while c < stop:
                l1i = c >> self.l2_bits
                tstop = min(stop, (l1i + 1) << self.l2_bits)
                async with self._meta:
                    await self._set_entries_in_table(l1i, c, tstop, zero=zero, unmap=unmap)
                self._release_frees()
                c = tstop

    async def _set_entries_in_table(
        self, l1i: int, c: int, stop: int, *, zero: bool, unmap: bool
    ) -> None:
        if not self.l1[l1i] & OFFSET_MASK and self.backing is None:
            return  # a whole unallocated table without backing already reads as zeros
        table = await self._writable_table(l1i)
        lo, hi = c & self.l2_mask, ((stop - 1) & self.l2_mask) + 1
        old = table.entries[lo:hi]
        new = array("Q", old)
        freed: list[int] = []
        for k, entry in enumerate(old):
            kind = classify(entry)
            keep = (
                zero
                and not unmap
                and (kind is Kind.NORMAL or kind is Kind.ZERO_ALLOC)
                and bool(entry & OFLAG_COPIED)
            )
            if keep:
                new[k] = (entry & (OFFSET_MASK | OFLAG_COPIED)) | OFLAG_ZERO
                continue
            if zero or (self.v3 and (self.backing is not None or kind is not Kind.UNALLOCATED)):
                new[k] = OFLAG_ZERO if self.v3 else 0
            else:
                new[k] = 0
            if kind is not Kind.UNALLOCATED and kind is not Kind.ZERO_PLAIN:
                freed.append(entry)
        if new == old:
            return
        table.entries[lo:hi] = new
        await self._fw(table.offset + lo * 8, encode_entries(new))
        for entry in freed:
            await self._free_entry(entry)

    # -- block status -------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        cb = self.cb
        end = min(self._size, offset + length)
        c = offset >> cb
        l1i = c >> self.l2_bits
        table = await self._table(l1i)
        if table is None:
            stop = (l1i + 1) << (self.l2_bits + cb)
            while stop < end and not self.l1[stop >> (self.l2_bits + cb)] & OFFSET_MASK:
                stop += 1 << (self.l2_bits + cb)
            return Extent(min(stop, self._size) - offset, Status.NONE)
        entries = table.entries
        entry = entries[c & self.l2_mask]
        kind = classify(entry)
        host = self._host(entry) if kind in (Kind.NORMAL, Kind.ZERO_ALLOC) else 0
        table_end = (l1i + 1) << (self.l2_bits + cb)
        pos = (c + 1) << cb
        if kind is not Kind.COMPRESSED:
            while pos < min(end, table_end):
                nxt = entries[(pos >> cb) & self.l2_mask]
                if classify(nxt) is not kind:
                    break
                if host and nxt & OFFSET_MASK != host + pos - (c << cb):
                    break
                pos += 1 << cb
        n = min(pos, self._size) - offset
        file_node = self.file.node
        intra = offset & (self.cs - 1)
        if kind is Kind.NORMAL:
            return Extent(n, Status.DATA | Status.OFFSET_VALID, host + intra, file_node)
        if kind is Kind.ZERO_ALLOC:
            return Extent(n, Status.ZERO | Status.OFFSET_VALID, host + intra, file_node)
        if kind is Kind.ZERO_PLAIN:
            return Extent(n, Status.ZERO)
        if kind is Kind.COMPRESSED:
            return Extent(n, Status.DATA)
        return Extent(n, Status.NONE)

    # -- resize -------------------------------------------------------------------------
    async def truncate(self, length: int) -> None:
        h = self.header
        assert h is not None
        length = -(-length // 512) * 512  # whole sectors, as QEMU sees the size
        if length < self._size:
            raise OSError(errno.ENOTSUP, "shrinking a qcow2 image is not supported")
        refcounts = await self._prepare_write()
        async with self._meta:
            need = -(-length // (self.cs << self.l2_bits))
            l1_offset = h.l1_table_offset
            if need > len(self.l1):
                if need * 8 > 32 << 20:
                    raise OSError(errno.EFBIG, "qcow2 L1 table would exceed 32 MiB")
                clusters = -(-need * 8 // self.cs)
                new_l1 = array("Q", self.l1)
                new_l1.extend([0] * (need - len(new_l1)))
                l1_offset = await refcounts.allocate(clusters)
                raw = encode_entries(new_l1)
                await self._fw(l1_offset, raw + bytes(clusters * self.cs - len(raw)))
                await self.file.flush()
            else:
                new_l1 = self.l1
            old_offset, old_size = h.l1_table_offset, len(self.l1)
            fields = struct.pack(">QIIQ", length, h.crypt_method, len(new_l1), l1_offset)
            await self._fw(OFF_SIZE, fields)
            h.size, h.l1_size, h.l1_table_offset = length, len(new_l1), l1_offset
            self.l1 = new_l1
            self._size = length
            if l1_offset != old_offset and old_size:
                await refcounts.free(old_offset, old_size * 8)
        self._release_frees()

    async def _set_refcount_table(self, table_offset: int, table_clusters: int) -> None:
        """Switch the header to a new refcount table (called by the allocator)."""
        h = self.header
        assert h is not None
        await self.file.flush()  # the new table must be durable before anyone uses it
        await self._fw(OFF_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters))
        h.refcount_table_offset, h.refcount_table_clusters = table_offset, table_clusters

    # -- introspection ------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        h = self.header
        assert h is not None
        return {
            "format": "qcow2",
            "version": h.version,
            "compat": "1.1" if h.version >= 3 else "0.10",
            "cluster-size": self.cs,
            "refcount-bits": h.refcount_bits,
            "backing-file": h.backing_file,
            "backing-format": h.backing_format,
            "l2-cache-tables": self.l2cache.capacity,
        }
