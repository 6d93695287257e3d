"""The ``file`` protocol driver: a regular file or a block device.

Options (besides the generic ``read-only``, ``cache.direct``, ``cache.no-flush``, ``discard``)::

    filename   path of a regular file or block device (required)
    aio        threads | native | io_uring  (default threads)
    locking    auto | on | off              (default auto)

**I/O engine.** Reads and writes first try the page cache from the event loop:
``preadv2``/``pwritev2`` with ``RWF_NOWAIT`` either complete at once or fail with EAGAIN
(data not cached, writeback would block), in which case the request goes to the bounded
thread pool of :mod:`nbdserve.block.threads`. Python offers neither Linux AIO nor io_uring, so
``aio=native`` and ``aio=io_uring`` are accepted for configurations written for QEMU and are
served by this same engine; the driver reports ``aio_engine == "threads"``. On tmpfs, which
refuses ``RWF_NOWAIT`` and never waits for a disk, both go inline. Some filesystems (ext4 in
Linux 6.x, for example) refuse ``RWF_NOWAIT`` on buffered writes only; there writes go inline
but are timed, and one that stalls (dirty-page throttling) sends writes to the thread pool
for a second. With
``cache.direct=on`` (O_DIRECT) nothing waits in the event loop: a direct transfer always
goes to the disk, so all of it runs in the thread pool.

**Buffers.** Reads return a ``memoryview`` of a recycled, page-aligned buffer that belongs to
the caller until the caller drops every reference to it; see ``nbdserve/block/buffers.py`` for why
(aligned copies out of the page cache are up to ten times faster) and for the ownership rule.

**FUA** is native: ``RWF_DSYNC`` on the write. **Flush** is ``fdatasync``; after one failed
flush every later one fails too, as in QEMU, because the kernel may already have dropped the
dirty pages whose writeback failed, so a later success would be a lie.

**Zeroing** (``FALLOC_FL_PUNCH_HOLE`` when unmapping is allowed, else ``FALLOC_FL_ZERO_RANGE``,
else punch a hole and allocate it again) never falls back to writing zeros itself: it raises
ENOTSUP and the generic layer writes zero buffers. Zeroing is advertised as cheap (NO_FALLBACK)
when hole punching works on the filesystem, probed at open without changing the file. Block
devices zero through ``fallocate`` too, but never claim to be cheap: the kernel may emulate
it by writing zeros. **Discard** punches holes (``BLKDISCARD`` on block devices); on a
filesystem that can't, the node has no discard callback at all.

**Block status** comes from ``lseek(SEEK_DATA/SEEK_HOLE)``: data is DATA, holes are ZERO,
both OFFSET_VALID with this node as the file. Block devices (and filesystems without
SEEK_DATA) report everything as data. As in QEMU, the last data extent found is remembered,
so walking a large data region costs no further ``lseek`` (slow on some filesystems); zero,
discard and truncate forget it. Only data is remembered: a stale entry can only claim
"data" for what reads as zeros, never the reverse.

**O_DIRECT** needs requests aligned to the device's logical block: probed at open with the
block-size ioctl on devices and with trial reads of 1, 512, ... 4096 bytes on files (a read
that succeeds at 1 byte proves nothing -- holes and EOF are not checked -- so it means
``max(4096, page size)``). The result is ``limits.request_alignment``.

**Locking** (``_file_lock.py``): QEMU-compatible OFD byte-range locks reflecting the node's
cumulative permissions, taken in ``check_perm``. Policy beyond QEMU's bytes: a node holding
WRITE never shares WRITE or RESIZE with other processes, whatever its users share among
themselves inside this process, so two writers on one image are always refused.
``locking=auto`` uses the locks where the filesystem has them, ``on`` insists, ``off``
skips them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import threads
from ..buffers import BufferPool, aligned
from ..driver import Driver, Opt
from ..errors import GraphError
from ..types import Buffer, Extent, Limits, Perm, ReqFlags, Status
from . import _file_sys as sys_
from ._file_lock import ImageLock, ImageLockedError, ofd_locks_supported

if TYPE_CHECKING:
    from ..io import Unlocker
    from ..node import Node

__all__ = ["FileDriver"]

_preadv = os.preadv
_pwritev = os.pwritev
#: Without flags, pwrite: no iovec list to build (0.25 µs of a 4 KiB write's ~2).
_pwrite = os.pwrite
_pread = os.pread
#: Reads up to this size skip the buffer pool where they can (see read_nowait).
SMALL_READ = 16 << 10
_RWF_NOWAIT = os.RWF_NOWAIT
_RWF_DSYNC = os.RWF_DSYNC
_FUA = ReqFlags.FUA
_NO_FLAGS = ReqFlags.NONE

#: Largest single transfer: below Linux's per-call cap of 0x7ffff000 bytes, and aligned.
MAX_TRANSFER = 1 << 30
#: Larger transfers go to a thread even when cached: copying them would hold up the event
#: loop for every other request (1 MiB is ~50-100 µs), and threads copy on both cores.
NOWAIT_MAX = 1 << 20
#: An inline write slower than this stalled the event loop: the disk is throttling dirty
#: pages, so writes go to the thread pool for INLINE_WRITE_PAUSE_NS.
INLINE_WRITE_STALL_NS = 2_000_000
INLINE_WRITE_PAUSE_NS = 1_000_000_000
_monotonic_ns = time.monotonic_ns
_PROBE_SIZES = (1, 512, 1024, 2048, 4096)
_DATA = Status.DATA | Status.OFFSET_VALID
_ZERO = Status.ZERO | Status.OFFSET_VALID
_PUNCH = sys_.FALLOC_FL_PUNCH_HOLE | sys_.FALLOC_FL_KEEP_SIZE
_ZERO_RANGE = sys_.FALLOC_FL_ZERO_RANGE | sys_.FALLOC_FL_KEEP_SIZE
#: errnos after which a fallocate mode is never tried again on this node. EINVAL is left out:
#: some filesystems return it just for a misaligned range.
_GONE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class FileDriver(Driver):
    """A node backed by one file descriptor on a regular file or block device."""

    name = "file"
    options: ClassVar[Mapping[str, Opt]] = {
        "filename": Opt(str, help="path of a regular file or block device"),
        "aio": Opt(
            ("threads", "native", "io_uring"),
            "threads",
            help="accepted for QEMU compatibility; all are served by RWF_NOWAIT + threads",
        ),
        "locking": Opt(
            ("auto", "on", "off"),
            "auto",
            help="QEMU-compatible image locks: auto = where the filesystem supports them",
        ),
    }
    supported_write_flags = ReqFlags.FUA

    def __init__(self, node: Node, opts: Mapping[str, Any]) -> None:
        super().__init__(node, opts)
        self.filename: str = opts["filename"]
        self.aio_engine = "threads"
        self.fd = -1
        self.is_block_device = False
        self.direct = False
        self.read_only = False
        self.lock: ImageLock | None = None
        self._size = 0
        self._align = 1
        self._pool = BufferPool()
        self._nowait_writes = True
        self._nowait_reads = True
        self._inline_writes_paused_until = 0
        #: preadv/pwritev flags of the non-blocking paths: RWF_NOWAIT, or 0 on a filesystem
        #: in memory (tmpfs refuses RWF_NOWAIT, and nothing there waits for a disk anyway).
        self._rwf_nowait = _RWF_NOWAIT
        self._memory_fs = False  # tmpfs and friends: reads and writes never wait for a disk
        self._can_punch = False
        self._can_zero_range = False
        self._can_blkdiscard = False
        self._seek_data = True
        #: [start, end) last found to be data: repeated queries skip lseek (see block_status).
        self._known_data = (0, 0)
        self._flush_error: OSError | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        node = self.node
        self.read_only = node.read_only
        self.direct = node.cache_direct
        self._pool = BufferPool(must_align=self.direct)
        # open() itself can wait for the disk (or a network filesystem): a thread too.
        fd = await threads.run_sync(self._open_fd)
        self.fd = fd
        try:
            await threads.run_sync(self._setup)
        except BaseException:
            self.fd = -1
            os.close(fd)
            raise

    def _open_fd(self) -> int:
        # O_NONBLOCK: opening a FIFO by mistake must fail below, not wait for a writer.
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        if self.direct:
            flags |= os.O_DIRECT
        try:
            return os.open(self.filename, flags)
        except OSError as exc:
            if self.direct and exc.errno == errno.EINVAL:
                raise self._error(
                    "the filesystem does not support O_DIRECT (cache.direct=on); "
                    "use cache.direct=off"
                ) from None
            hint = " (read-only=on opens it without write access)" if (
                exc.errno in (errno.EACCES, errno.EROFS) and not self.read_only
            ) else ""
            raise self._error(f"cannot open: {exc.strerror}{hint}", key="filename") from None
        except ValueError as exc:  # e.g. an embedded NUL byte
            raise self._error(f"cannot open: {exc}", key="filename") from None

    def _setup(self) -> None:
        """Everything at open that may touch the disk (so it runs in a worker thread)."""
        fd = self.fd
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            self.is_block_device = True
            self._size = os.lseek(fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self._size = st.st_size
        else:
            raise self._error("not a regular file or block device", key="filename")
        os.set_blocking(fd, True)
        # A device node's filesystem (devtmpfs) says nothing of the device behind it.
        if not self.is_block_device and sys_.is_memory_fs(fd):
            self._rwf_nowait = 0
            self._memory_fs = True
        if self.direct:
            self._align = self._probe_alignment()
        self._probe_fallocate()
        mode = self.opts.get("locking", "auto")
        if mode != "off":
            if ofd_locks_supported(fd):
                self.lock = ImageLock(fd, self.filename)
            elif mode == "on":
                raise self._error(
                    "locking=on, but the filesystem does not support OFD locks", key="locking"
                )
        self.limits = Limits(
            request_alignment=self._align,
            max_transfer=MAX_TRANSFER,
            discard_alignment=self._align if self.is_block_device else 0,
        )
        # The node binds callbacks with getattr; None withdraws one this node can't serve.
        if self.direct:
            # Nothing direct is cheap enough for the event loop, and there is no page
            # cache for a prefetch to fill.
            self._withdraw("read_nowait", "read_unlocked", "read_splice", "write_nowait",
                           "write_unlocked", "cache")
        elif not self._memory_fs:
            # sendfile from a disk would block the connection's thread on a cache miss.
            self._withdraw("read_splice")
        if self.read_only:
            self._withdraw("write_nowait", "write_unlocked", "write", "zero", "discard",
                           "truncate")
        elif not self._can_punch and not self.is_block_device:
            self._withdraw("discard")

    def _withdraw(self, *names: str) -> None:
        for name in names:
            setattr(self, name, None)

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            # Closing drops the OFD locks with the open file description.
            self.lock = None
            self._pool = BufferPool()  # let the pooled buffers go (callers keep theirs)
            os.close(fd)

    def length(self) -> int:
        return self._size

    def _error(self, message: str, key: str | None = None) -> GraphError:
        return GraphError.at(self.node.name, key, f"'{self.filename}': {message}")

    # -- probes -----------------------------------------------------------------------------
    def _probe_alignment(self) -> int:
        if self.is_block_device:
            try:
                return sys_.block_device_sector_size(self.fd)
            except OSError:
                pass  # fall back to trial reads
        page = mmap.PAGESIZE
        with memoryview(aligned(max(page, _PROBE_SIZES[-1]))) as view:
            for size in _PROBE_SIZES:
                try:
                    os.preadv(self.fd, [view[:size]], 0)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        continue
                    raise self._error(f"probing the O_DIRECT alignment: {exc.strerror}") from None
                return size if size > 1 else max(4096, page)
        raise self._error("could not find a working O_DIRECT alignment")

    def _probe_fallocate(self) -> None:
        """Whether hole punching works here, without changing the file: punching past the
        end with KEEP_SIZE is a no-op to every filesystem that supports it."""
        if self.read_only:
            return
        if self.is_block_device:
            # Devices reject ranges past their end: their support shows on first use. Not
            # NO_FALLBACK: the kernel may emulate zeroing by writing zeros.
            self._can_punch = self._can_zero_range = self._can_blkdiscard = True
            self.supported_zero_flags = ReqFlags.MAY_UNMAP
            return
        try:
            sys_.fallocate(self.fd, _PUNCH, self._size, 1)
        except OSError as exc:
            if exc.errno not in sys_.UNSUPPORTED_ERRNOS:
                raise
            return
        self._can_punch = self._can_zero_range = True
        self.supported_zero_flags = ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK

    # -- permissions / locking --------------------------------------------------------------
    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if self.lock is None:
            return
        if perm & Perm.WRITE:
            shared &= ~(Perm.WRITE | Perm.RESIZE)
        try:
            self.lock.prepare(perm, shared)
        except ImageLockedError as exc:
            raise GraphError.at(self.node.name, None, exc.strerror or str(exc)) from None

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.lock is not None:
            self.lock.commit()

    def abort_perm(self) -> None:
        if self.lock is not None:
            self.lock.abort()

    # -- reads ------------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        if length > NOWAIT_MAX or not self._nowait_reads:
            return None
        if length <= SMALL_READ and self._memory_fs:
            # A memory filesystem, where nothing waits for a disk: a small read into a new
            # bytes object costs 0.5 µs less than a pooled buffer (4 KiB: 1.43 vs 1.95 µs).
            data = _pread(self.fd, length, offset)
            return data if len(data) == length else None
        buf = self._pool.take(length)
        return buf if self._read_cached(buf, offset) else None

    def read_unlocked(self, offset: int, length: int, unlock: Unlocker) -> Buffer | None:
        if length > NOWAIT_MAX or not self._nowait_reads:
            return None
        buf = self._pool.take(length)  # the pool is not thread-safe: before letting go
        with unlock:  # only the descriptor, the caller's buffer and a flag are touched
            cached = self._read_cached(buf, offset)
        return buf if cached else None

    def read_splice(self, offset: int, length: int) -> tuple[int, int] | None:
        # Only on a memory filesystem (withdrawn elsewhere). A range that starts in a hole
        # goes the way that finds its holes (a sparse read); SEEK_DATA answers at once when
        # the first page is there.
        try:
            return (self.fd, offset) if os.lseek(self.fd, offset, os.SEEK_DATA) == offset else None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return None
            raise

    def _read_cached(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` from the page cache without waiting for the disk; False if not all
        of it is cached (partly cached, or the file shrank: read() decides)."""
        try:
            return _preadv(self.fd, [buf], offset, self._rwf_nowait) == len(buf)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            # This filesystem can't do non-blocking buffered reads: stop asking.
            self._nowait_reads = False
            return False

    async def read(self, offset: int, length: int) -> Buffer:
        buf = self._pool.take(length)
        await threads.run_sync(self._pread, buf, offset)
        return buf

    def _pread(self, buf: memoryview, offset: int) -> None:
        length = len(buf)
        done = _preadv(self.fd, [buf], offset)
        while done < length:
            # Short reads happen only at the end of the file (it shrank under us). With
            # O_DIRECT another read would start misaligned: stop at once.
            n = 0 if self.direct else _preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # past the end, a file reads as zeros
                buf[done:] = bytes(length - done)
                return
            done += n

    # -- writes -----------------------------------------------------------------------------
    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        # A durable (FUA) write waits for the disk and a large one holds up the loop: write()
        # takes those. So does a partial write, writing the same bytes again.
        # Flag arithmetic runs Python code (and builds a new member): the generic layer only
        # calls with no flags at all, so an identity test settles the common case.
        if len(data) > NOWAIT_MAX or (flags is not _NO_FLAGS and flags & _FUA):
            return False
        if self._memory_fs:  # a write never waits for a disk
            return _pwrite(self.fd, data, offset) == len(data)
        if not self._nowait_writes:
            return self._write_inline(offset, data)
        try:
            return _pwritev(self.fd, [data], offset, self._rwf_nowait) == len(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # This filesystem can't do non-blocking buffered writes: stop asking.
            self._nowait_writes = False
            return False

    def write_unlocked(self, offset: int, data: Buffer, unlock: Unlocker) -> bool:
        # Blocking holds up this connection only, but larger writes overlap better as
        # several tasks in the pool, and while writes stall (see below) they all go there.
        if len(data) > NOWAIT_MAX or _monotonic_ns() < self._inline_writes_paused_until:
            return False
        with unlock:  # only the descriptor is touched; the node outlives every request
            done = _pwrite(self.fd, data, offset)
            if done < len(data):  # short writes are allowed to happen: write the rest
                view = memoryview(data)
                while done < len(data):
                    done += _pwrite(self.fd, view[done:], offset + done)
        return True

    def _write_inline(self, offset: int, data: Buffer) -> bool:
        # The filesystem can't say whether a buffered write would block (ext4 refuses
        # RWF_NOWAIT for writes). A write into the page cache almost never does, and a thread
        # hop costs far more than the copy, so write inline but time it: one slow enough to
        # stall the loop (dirty-page throttling on a slow disk) sends writes to the thread
        # pool for a while.
        start = _monotonic_ns()
        if start < self._inline_writes_paused_until:
            return False
        done = _pwrite(self.fd, data, offset)
        if _monotonic_ns() - start > INLINE_WRITE_STALL_NS:
            self._inline_writes_paused_until = start + INLINE_WRITE_PAUSE_NS
        return done == len(data)

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        rwf = _RWF_DSYNC if flags & _FUA else 0
        if self.direct:
            bounce = self._pool.take(len(data))
            await threads.run_sync(self._pwrite_direct, bounce, data, offset, rwf)
        else:
            await threads.run_sync(self._pwrite, data, offset, rwf)

    def _pwrite(self, data: Buffer, offset: int, rwf: int) -> None:
        length = len(data)
        done = _pwritev(self.fd, [data], offset, rwf)
        if done < length:
            with memoryview(data) as view:
                while done < length:
                    done += _pwritev(self.fd, [view[done:]], offset + done, rwf)

    def _pwrite_direct(self, bounce: memoryview, data: Buffer, offset: int, rwf: int) -> None:
        length = len(data)
        bounce[:] = data  # O_DIRECT needs aligned memory: copy into a page-aligned buffer
        done = 0
        while done < length:
            done += _pwritev(self.fd, [bounce[done:]], offset + done, rwf)
        if offset + length > self._size:
            # The generic layer padded the last partial block of the image; don't let the
            # padding grow the file.
            os.ftruncate(self.fd, self._size)

    # -- zero, discard ----------------------------------------------------------------------
    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        self._known_data = (0, 0)
        try:
            await threads.run_sync(self._zero, offset, length, flags)
        finally:
            self._known_data = (0, 0)  # a query racing with us may have cached the old map

    def _zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        unmap = flags & ReqFlags.MAY_UNMAP
        if unmap and self._can_punch and self._try_fallocate(_PUNCH, offset, length):
            return
        if self._can_zero_range and self._try_fallocate(
            _ZERO_RANGE, offset, length, "_can_zero_range"
        ):
            return
        if (
            self._can_punch
            and not self.is_block_device
            and self._try_fallocate(_PUNCH, offset, length)
        ):
            # Allocate the range again: the caller asked for zeros, not for a hole. Failing
            # that (e.g. ENOSPC) still leaves the range reading as zeros.
            with contextlib.suppress(OSError):
                sys_.fallocate(self.fd, sys_.FALLOC_FL_KEEP_SIZE, offset, length)
            return
        raise OSError(errno.ENOTSUP, f"'{self.filename}' cannot zero a range without writing")

    def _try_fallocate(
        self, mode: int, offset: int, length: int, capability: str = "_can_punch"
    ) -> bool:
        """One fallocate; False when this filesystem can't, raising real failures."""
        try:
            sys_.fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in _GONE:
                setattr(self, capability, False)
                return False
            if exc.errno == errno.EINVAL:
                return False
            raise
        return True

    async def discard(self, offset: int, length: int) -> None:
        self._known_data = (0, 0)
        try:
            await self._discard(offset, length)
        finally:
            self._known_data = (0, 0)

    async def _discard(self, offset: int, length: int) -> None:
        if self.is_block_device:
            # BLKDISCARD takes whole sectors; a discard may always do less than asked.
            mask = self._align - 1
            start = (offset + mask) & ~mask
            end = (offset + length) & ~mask
            if end > start and self._can_blkdiscard:
                await threads.run_sync(self._blkdiscard, start, end - start)
        elif self._can_punch:
            await threads.run_sync(self._try_fallocate, _PUNCH, offset, length)

    def _blkdiscard(self, offset: int, length: int) -> None:
        try:
            sys_.block_device_discard(self.fd, offset, length)
        except OSError as exc:
            if exc.errno not in sys_.UNSUPPORTED_ERRNOS:
                raise
            self._can_blkdiscard = False  # the device can't: later discards do nothing

    # -- flush, cache, truncate -------------------------------------------------------------
    async def flush(self) -> None:
        if self._flush_error is not None:
            raise self._flush_error
        try:
            await threads.run_sync(os.fdatasync, self.fd)
        except OSError as exc:
            if not self.direct:
                self._flush_error = OSError(
                    exc.errno or errno.EIO,
                    f"'{self.filename}': an earlier flush failed ({exc.strerror}); written "
                    "data may be lost, so no flush can succeed any more",
                )
            raise

    async def cache(self, offset: int, length: int) -> None:
        await threads.run_sync(os.posix_fadvise, self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def truncate(self, length: int) -> None:
        if self.is_block_device:
            raise OSError(errno.ENOTSUP, f"'{self.filename}': a block device cannot be resized")
        self._known_data = (0, 0)
        await threads.run_sync(os.ftruncate, self.fd, length)
        self._size = length
        self._known_data = (0, 0)

    # -- block status -----------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        # lseek on the extent tree does not wait for file data; QEMU calls it inline too.
        node = self.node
        if self.is_block_device or not self._seek_data:
            return Extent(length, _DATA, offset, node)
        start, end = self._known_data
        if start <= offset < end:
            return Extent(end - offset, _DATA, offset, node)
        align = self._align
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here on: a hole up to the end
                zeros = max(self._size - offset, length)
                return Extent(zeros + -zeros % align, _ZERO, offset, node)
            if exc.errno in sys_.UNSUPPORTED_ERRNOS:
                self._seek_data = False
            return Extent(length, _DATA, offset, node)  # unknown: data is the safe answer
        if data > offset:
            zeros = data - offset
            if align > 1:
                zeros -= zeros % align  # a hole not aligned to our blocks: count what is
            if zeros:
                return Extent(zeros, _ZERO, offset, node)
            return Extent(align, _DATA, offset, node)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = offset  # the file shrank between the two calls
        if hole <= offset:
            # Someone punched a hole between the two calls: data is the safe answer.
            return Extent(length, _DATA, offset, node)
        run = hole - offset
        run += -run % align  # round up an unaligned end of file
        self._known_data = (offset, offset + run)
        return Extent(run, _DATA, offset, node)
