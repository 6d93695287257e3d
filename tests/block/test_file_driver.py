"""The ``file`` driver on real files: every callback, called directly (no graph).

Behaviour is observed from outside the driver where possible: file contents, ``st_blocks``,
``SEEK_DATA``/``SEEK_HOLE``, what the page cache holds.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nbdserve.block import threads
from nbdserve.block.drivers import _file_sys, file
from nbdserve.block.drivers.file import FileDriver
from nbdserve.block.errors import GraphError
from nbdserve.block.types import ReqFlags, Status

MiB = 1 << 20


class StubNode:
    """The few node attributes the driver reads."""

    def __init__(self, read_only: bool = False, cache_direct: bool = False) -> None:
        self.name = "f0"
        self.read_only = read_only
        self.cache_direct = cache_direct


async def open_driver(
    path: Path | str, *, read_only: bool = False, direct: bool = False, **opts: Any
) -> FileDriver:
    options = {"filename": str(path), "aio": "threads", "locking": "auto", **opts}
    drv = FileDriver(StubNode(read_only, direct), options)  # type: ignore[arg-type]
    await drv.open()
    return drv


def make_file(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in (data or {}).items():
            f.seek(off)
            f.write(chunk)
    return path


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip())


@pytest.fixture
def img(tmp_path: Path) -> Path:
    data = bytes(range(256)) * 16  # 4 KiB of a recognisable pattern
    return make_file(tmp_path / "img", 4 * MiB, {0: data * 16, 2 * MiB: data})


@pytest.fixture
async def drv(img: Path) -> AsyncIterator[FileDriver]:
    d = await open_driver(img)
    yield d
    await d.close()


# -- open ------------------------------------------------------------------------------------
async def test_open_reports_size_limits_and_capabilities(drv: FileDriver, img: Path) -> None:
    assert drv.length() == 4 * MiB
    assert drv.limits.request_alignment == 1
    assert drv.limits.max_transfer == file.MAX_TRANSFER
    assert drv.supported_write_flags == ReqFlags.FUA
    # ext4 punches holes, so zeroing is cheap and may unmap.
    assert drv.supported_zero_flags == ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK
    assert drv.aio_engine == "threads"
    assert not drv.is_block_device and not drv.direct


async def test_open_missing_file_names_node_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(GraphError) as info:
        await open_driver(missing)
    msg = str(info.value)
    assert "node 'f0'" in msg and "filename" in msg and str(missing) in msg
    assert "No such file" in msg


async def test_open_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="not a regular file or block device"):
        await open_driver(tmp_path, read_only=True)


async def test_open_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with trio.fail_after(10):
        with pytest.raises(GraphError, match="not a regular file or block device"):
            await open_driver(fifo, read_only=True)
        with pytest.raises(GraphError, match="not a regular file or block device"):
            await open_driver(fifo)


async def test_open_refuses_a_character_device_and_a_nul_byte() -> None:
    with pytest.raises(GraphError, match="not a regular file or block device"):
        await open_driver("/dev/zero", read_only=True)
    with pytest.raises(GraphError, match=r"option 'filename'.*null"):
        await open_driver("bad\0name")


async def test_descriptor_is_blocking(drv: FileDriver) -> None:
    assert os.get_blocking(drv.fd)


async def test_open_without_write_access_hints_at_read_only(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def no_write_access(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_RDWR:  # as a non-root user opening a 0444 file sees it
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", no_write_access)
    with pytest.raises(GraphError, match=r"Permission denied \(read-only=on opens it"):
        await open_driver(img)
    d = await open_driver(img, read_only=True)
    await d.close()


async def test_read_only_node_has_no_write_callbacks(img: Path) -> None:
    d = await open_driver(img, read_only=True)
    try:
        for name in ("write", "write_nowait", "zero", "discard", "truncate"):
            assert getattr(d, name) is None, name
        assert await d.read(0, 4096) == bytes(range(256)) * 16
        with pytest.raises(OSError) as info:  # the descriptor itself is read-only
            os.pwrite(d.fd, b"x", 0)
        assert info.value.errno == errno.EBADF
    finally:
        await d.close()


async def test_close_releases_the_descriptor(img: Path) -> None:
    d = await open_driver(img)
    fd = d.fd
    await d.close()
    assert d.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    await d.close()  # idempotent


# -- reads -----------------------------------------------------------------------------------
async def test_read_nowait_returns_cached_data(drv: FileDriver, img: Path) -> None:
    expected = img.read_bytes()  # also pulls the file into the page cache
    buf = drv.read_nowait(4096, 8192)
    assert buf is not None and bytes(buf) == expected[4096 : 4096 + 8192]


async def test_tmpfs_serves_reads_and_writes_without_a_thread() -> None:
    # tmpfs refuses RWF_NOWAIT (EOPNOTSUPP); nothing there waits for a disk, so the
    # non-blocking paths must still serve it inline rather than fail or always go to threads.
    path = make_file(Path(tempfile.mkdtemp(dir="/dev/shm")) / "img", 1 * MiB, {0: b"\x5a" * 4096})
    d = await open_driver(path)
    try:
        buf = d.read_nowait(0, 4096)
        assert buf is not None and bytes(buf) == b"\x5a" * 4096
        large = d.read_nowait(0, 65536)  # above SMALL_READ: a pooled buffer
        assert large is not None and bytes(large[:4096]) == b"\x5a" * 4096
        assert d.read_nowait(MiB - 4096, 8192) is None  # short at the end: read() decides
        assert d.write_nowait(8192, b"\xa5" * 4096, ReqFlags.NONE)
        assert path.read_bytes()[8192:12288] == b"\xa5" * 4096
    finally:
        await d.close()
        shutil.rmtree(path.parent)


async def test_read_nowait_declines_uncached_data_and_read_uses_the_pool(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = img.read_bytes()
    drop_cache(img)
    assert drv.read_nowait(2 * MiB, 4096) is None  # EAGAIN: it would wait for the disk
    hops = []
    real = threads.run_sync

    async def counting(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(threads, "run_sync", counting)
    buf = await drv.read(2 * MiB, 4096)
    assert bytes(buf) == expected[2 * MiB : 2 * MiB + 4096]
    assert len(hops) == 1


async def test_large_transfers_always_go_to_a_thread(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img.read_bytes()
    size = file.NOWAIT_MAX * 2
    assert drv.read_nowait(0, size) is None
    calls = []
    monkeypatch.setattr(file, "_pwritev", lambda *args: calls.append(args))
    monkeypatch.setattr(file, "_pwrite", lambda *args: calls.append(args))
    assert drv.write_nowait(0, bytes(size), ReqFlags.NONE) is False
    assert calls == []  # not even tried
    monkeypatch.undo()
    assert bytes(await drv.read(0, size)) == img.read_bytes()[:size]


async def test_read_of_a_file_that_shrank_reads_zeros_past_the_end(
    drv: FileDriver, img: Path
) -> None:
    os.truncate(img, 6000)
    buf = await drv.read(4096, 8192)
    assert bytes(buf[: 6000 - 4096]) == img.read_bytes()[4096:]
    assert bytes(buf[6000 - 4096 :]) == bytes(8192 - (6000 - 4096))
    assert drv.read_nowait(4096, 8192) is None  # short: read() must finish it


async def test_read_buffers_are_page_aligned_and_recycled_once_dropped(
    drv: FileDriver, img: Path
) -> None:
    n = 65536  # above SMALL_READ: pooled on every filesystem (tmpfs reads 4 KiB with pread)
    expected = img.read_bytes()[:n]
    first = drv.read_nowait(0, n)
    second = drv.read_nowait(0, n)
    assert isinstance(first, memoryview) and isinstance(second, memoryview)
    assert first.obj is not second.obj
    assert address(first) % mmap.PAGESIZE == 0
    second_id = id(second.obj)
    del second  # the caller is done with it: the pool may hand it out again
    third = drv.read_nowait(0, n)
    assert isinstance(third, memoryview) and id(third.obj) == second_id
    view = third[100:200]  # a view, even of a slice, keeps it busy
    del third
    fourth = drv.read_nowait(0, n)
    assert isinstance(fourth, memoryview)
    assert fourth.obj is not first.obj and id(fourth.obj) != second_id
    assert bytes(view) == expected[100:200]  # untouched by the later reads
    assert bytes(first) == bytes(fourth) == expected


async def test_errors_come_back_as_oserror(drv: FileDriver) -> None:
    os.close(drv.fd)  # pull the descriptor away underneath the driver
    try:
        with pytest.raises(OSError) as info:
            drv.read_nowait(0, 4096)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            await drv.read(0, 4096)
    finally:
        drv.fd = -1


# -- writes ----------------------------------------------------------------------------------
async def test_write_nowait_either_writes_or_declines(drv: FileDriver, img: Path) -> None:
    before = img.read_bytes()
    data = b"\xab" * 4096
    done = drv.write_nowait(8192, data, ReqFlags.NONE)
    after = img.read_bytes()
    if done:
        assert after[8192 : 8192 + 4096] == data
    else:
        assert after == before
        await drv.write(8192, data, ReqFlags.NONE)
        assert img.read_bytes()[8192 : 8192 + 4096] == data


async def test_write_nowait_learns_that_the_filesystem_refuses(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = os.pwritev

    def refuse_nowait(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        calls.append(flags)
        if flags & os.RWF_NOWAIT:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, bufs, offset, flags)

    def plain(fd: int, data: Any, offset: int) -> int:
        calls.append(0)
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(file, "_pwritev", refuse_nowait)
    monkeypatch.setattr(file, "_pwrite", plain)
    drv._rwf_nowait = os.RWF_NOWAIT  # as on a disk filesystem (the test image may be tmpfs)
    assert drv.write_nowait(0, b"x" * 512, ReqFlags.NONE) is False
    # Asked once, then remembered: later writes go inline (timed), without RWF_NOWAIT.
    assert drv.write_nowait(0, b"y" * 512, ReqFlags.NONE) is True
    assert calls == [os.RWF_NOWAIT, 0]
    assert img.read_bytes()[:512] == b"y" * 512


async def test_a_stalled_inline_write_sends_writes_to_threads_for_a_while(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv._nowait_writes = False  # as on ext4, which refuses RWF_NOWAIT for writes
    clock = iter([0, 5_000_000, 10_000_000, 2_000_000_000, 2_000_000_100])
    monkeypatch.setattr(file, "_monotonic_ns", lambda: next(clock))
    assert drv.write_nowait(0, b"a" * 512, ReqFlags.NONE) is True  # done, but took 5 ms
    assert drv.write_nowait(0, b"b" * 512, ReqFlags.NONE) is False  # paused: thread pool
    assert img.read_bytes()[:512] == b"a" * 512
    assert drv.write_nowait(0, b"c" * 512, ReqFlags.NONE) is True  # a second later: inline
    assert img.read_bytes()[:512] == b"c" * 512


async def test_write_nowait_would_block_is_false(
    drv: FileDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(file, "_pwritev", busy)
    drv._rwf_nowait = os.RWF_NOWAIT  # as on a disk filesystem (the test image may be tmpfs)
    assert drv.write_nowait(0, b"x" * 512, ReqFlags.NONE) is False
    assert drv._nowait_writes  # EAGAIN is "not now", not "never"


async def test_write_with_fua_uses_rwf_dsync(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    real = os.pwritev

    def spy(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        seen.append(flags)
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(file, "_pwritev", spy)
    assert drv.write_nowait(0, b"F" * 4096, ReqFlags.FUA) is False  # durable: not inline
    await drv.write(0, b"F" * 4096, ReqFlags.FUA)
    await drv.write(4096, b"N" * 4096, ReqFlags.NONE)
    assert seen == [os.RWF_DSYNC, 0]
    assert img.read_bytes()[:8192] == b"F" * 4096 + b"N" * 4096


async def test_write_finishes_short_writes(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev

    def dribble(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        (buf,) = bufs
        return real(fd, [memoryview(buf)[:1000]], offset, flags)

    monkeypatch.setattr(file, "_pwritev", dribble)
    data = os.urandom(10_000)
    await drv.write(12345, data, ReqFlags.NONE)
    assert img.read_bytes()[12345 : 12345 + 10_000] == data


# -- zero and discard ------------------------------------------------------------------------
def blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def is_hole(path: Path, offset: int, length: int) -> bool:
    """True if [offset, offset+length) is entirely a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return True
        return data >= offset + length
    finally:
        os.close(fd)


async def test_zero_with_may_unmap_punches_a_hole(drv: FileDriver, img: Path) -> None:
    allocated = blocks(img)
    await drv.zero(16384, 32768, ReqFlags.MAY_UNMAP)
    assert img.read_bytes()[16384 : 16384 + 32768] == bytes(32768)
    assert blocks(img) == allocated - 32768
    assert is_hole(img, 16384, 32768)
    assert drv.length() == os.path.getsize(img) == 4 * MiB


async def test_zero_without_may_unmap_keeps_the_allocation(drv: FileDriver, img: Path) -> None:
    allocated = blocks(img)
    await drv.zero(16384, 32768, ReqFlags.NONE)
    assert img.read_bytes()[16384 : 16384 + 32768] == bytes(32768)
    assert blocks(img) >= allocated  # ZERO_RANGE: still allocated (as unwritten extents)


async def test_zero_of_unaligned_range_zeroes_exactly_that(drv: FileDriver, img: Path) -> None:
    before = img.read_bytes()
    await drv.zero(1000, 5000, ReqFlags.MAY_UNMAP)
    after = img.read_bytes()
    assert after[1000:6000] == bytes(5000)
    assert after[:1000] == before[:1000] and after[6000:] == before[6000:]


async def test_zero_falls_back_down_the_list_and_remembers(
    drv: FileDriver, img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []
    real = _file_sys.fallocate

    def no_zero_range(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        if mode & _file_sys.FALLOC_FL_ZERO_RANGE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        real(fd, mode, offset, length)

    monkeypatch.setattr(_file_sys, "fallocate", no_zero_range)
    await drv.zero(0, 8192, ReqFlags.NONE)
    await drv.zero(8192, 8192, ReqFlags.NONE)
    punch = _file_sys.FALLOC_FL_PUNCH_HOLE | _file_sys.FALLOC_FL_KEEP_SIZE
    zero_range = _file_sys.FALLOC_FL_ZERO_RANGE | _file_sys.FALLOC_FL_KEEP_SIZE
    keep = _file_sys.FALLOC_FL_KEEP_SIZE
    # punch + re-allocate; the second time ZERO_RANGE is not even tried
    assert modes == [zero_range, punch, keep, punch, keep]
    assert img.read_bytes()[:16384] == bytes(16384)
    assert not is_hole(img, 0, 16384)  # allocated again


async def test_zero_reports_enotsup_when_the_filesystem_cannot(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(_file_sys, "fallocate", refuse)
    d = await open_driver(img)
    try:
        assert d.supported_zero_flags == ReqFlags.NONE  # probed at open: not cheap
        assert d.discard is None  # no way to free space: no discard callback
        with pytest.raises(OSError) as info:
            await d.zero(0, 4096, ReqFlags.MAY_UNMAP)
        assert info.value.errno == errno.ENOTSUP
        assert str(img) in str(info.value)
    finally:
        await d.close()


async def test_open_probe_does_not_change_the_file(img: Path) -> None:
    before = (img.read_bytes(), os.path.getsize(img), blocks(img))
    d = await open_driver(img)
    await d.close()
    assert (img.read_bytes(), os.path.getsize(img), blocks(img)) == before


async def test_discard_frees_space_and_reads_zeros(drv: FileDriver, img: Path) -> None:
    allocated = blocks(img)
    await drv.discard(4096, 16384)
    assert blocks(img) == allocated - 16384
    assert is_hole(img, 4096, 16384)
    assert img.read_bytes()[4096 : 4096 + 16384] == bytes(16384)


# -- block status ----------------------------------------------------------------------------
async def test_block_status_maps_data_and_holes(drv: FileDriver) -> None:
    # img: data [0, 64K), hole [64K, 2M), data [2M, 2M+4K), hole to 4M
    e = await drv.block_status(0, 4 * MiB)
    assert (e.length, e.status, e.map_offset, e.file) == (65536, Status.DATA | Status.OFFSET_VALID,
                                                         0, drv.node)
    e = await drv.block_status(4096, 100)  # may run past the request, up to the hole
    assert (e.length, e.status, e.map_offset) == (65536 - 4096, Status.DATA | Status.OFFSET_VALID,
                                                  4096)
    e = await drv.block_status(65536, 4 * MiB - 65536)
    assert (e.length, e.status, e.map_offset) == (2 * MiB - 65536,
                                                  Status.ZERO | Status.OFFSET_VALID, 65536)
    e = await drv.block_status(2 * MiB, 4096)
    assert (e.length, e.status) == (4096, Status.DATA | Status.OFFSET_VALID)
    e = await drv.block_status(2 * MiB + 4096, 8192)  # trailing hole: ENXIO from SEEK_DATA
    assert (e.length, e.status) == (2 * MiB - 4096, Status.ZERO | Status.OFFSET_VALID)


async def test_block_status_follows_zero_and_discard(drv: FileDriver) -> None:
    await drv.discard(0, 65536)
    e = await drv.block_status(0, 4 * MiB)
    assert e.status == Status.ZERO | Status.OFFSET_VALID and e.length == 2 * MiB


async def test_block_status_without_seek_data_says_data(
    drv: FileDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    e = await drv.block_status(65536, 8192)
    assert (e.length, e.status) == (8192, Status.DATA | Status.OFFSET_VALID)
    assert not drv._seek_data


async def test_block_status_of_a_fully_written_file_is_one_extent(tmp_path: Path) -> None:
    path = tmp_path / "full"
    path.write_bytes(os.urandom(100_000))  # not a multiple of any block size
    d = await open_driver(path)
    try:
        e = await d.block_status(0, 100_000)
        assert (e.length, e.status) == (100_000, Status.DATA | Status.OFFSET_VALID)
    finally:
        await d.close()


# -- flush, cache, truncate ------------------------------------------------------------------
async def test_flush_runs_fdatasync_in_a_thread(
    drv: FileDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    synced = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append((fd, threading.current_thread() is threading.main_thread()))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    await drv.flush()
    assert synced == [(drv.fd, False)]


async def test_a_failed_flush_is_sticky(drv: FileDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError) as first:
        await drv.flush()
    assert first.value.errno == errno.EIO
    monkeypatch.undo()
    with pytest.raises(OSError) as again:  # the disk recovered, but data may have been lost
        await drv.flush()
    assert again.value.errno == errno.EIO and "earlier flush failed" in str(again.value)


async def test_cache_pulls_the_range_into_the_page_cache(drv: FileDriver, img: Path) -> None:
    drop_cache(img)
    assert cached_bytes(img) == 0
    await drv.cache(0, 65536)
    with trio.move_on_after(10):  # readahead completes asynchronously
        while cached_bytes(img) < 65536:
            await trio.sleep(0.01)
    assert cached_bytes(img) >= 65536


async def test_truncate_grows_and_shrinks(drv: FileDriver, img: Path) -> None:
    await drv.truncate(5 * MiB + 123)
    assert drv.length() == os.path.getsize(img) == 5 * MiB + 123
    await drv.truncate(MiB)
    assert drv.length() == os.path.getsize(img) == MiB


# -- O_DIRECT ----------------------------------------------------------------------------------
def address(buf: Any) -> int:
    import ctypes

    view = memoryview(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(view.obj if not view.readonly else view))


async def test_direct_probes_alignment_and_uses_aligned_buffers(img: Path) -> None:
    d = await open_driver(img, direct=True)
    try:
        align = d.limits.request_alignment
        assert align in (512, 1024, 2048, 4096)
        # never in the event loop; no page cache to prefetch into
        assert d.read_nowait is None and d.write_nowait is None and d.cache is None
        data = os.urandom(align * 3)
        await d.write(align, data, ReqFlags.FUA)
        buf = await d.read(align, align * 3)
        assert bytes(buf) == data
        assert isinstance(buf, memoryview) and isinstance(buf.obj, mmap.mmap)
        assert address(buf) % mmap.PAGESIZE == 0
    finally:
        await d.close()
    assert img.read_bytes()[align : align * 4] == data


async def test_direct_on_an_empty_file_assumes_a_page(tmp_path: Path) -> None:
    # Reads at EOF succeed at any alignment, so the probe can't tell: be safe.
    d = await open_driver(make_file(tmp_path / "empty", 0), direct=True)
    try:
        assert d.limits.request_alignment == max(4096, mmap.PAGESIZE)
    finally:
        await d.close()


async def test_direct_write_of_the_padded_tail_keeps_the_size(tmp_path: Path) -> None:
    path = make_file(tmp_path / "odd", 10_000, {0: b"\x11" * 10_000})
    d = await open_driver(path, direct=True)
    try:
        align = d.limits.request_alignment
        start = 10_000 - 10_000 % align
        await d.write(start, b"\x22" * align, ReqFlags.NONE)  # as the generic layer pads it
        assert os.path.getsize(path) == d.length() == 10_000
        assert path.read_bytes()[start:] == b"\x22" * (10_000 - start)
        buf = await d.read(start, align)
        assert bytes(buf) == b"\x22" * (10_000 - start) + bytes(align - (10_000 - start))
    finally:
        await d.close()


async def test_direct_refused_by_the_filesystem_is_a_clear_error(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def no_direct(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(GraphError) as info:
        await open_driver(img, direct=True)
    msg = str(info.value)
    assert "O_DIRECT" in msg and "cache.direct=off" in msg and str(img) in msg


async def test_direct_alignment_not_found_is_a_clear_error(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def einval(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", einval)
    with pytest.raises(GraphError, match="could not find a working O_DIRECT alignment"):
        await open_driver(img, direct=True)


# -- block devices (a loop device over a file) -------------------------------------------------
@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = make_file(tmp_path / "loop.img", 8 * MiB, {0: b"\x5a" * MiB})
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device available: {exc}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


async def test_block_device(loop_device: str) -> None:
    d = await open_driver(loop_device)
    try:
        assert d.is_block_device and d.length() == 8 * MiB
        # /dev is devtmpfs, a memory filesystem; the device behind the node is not.
        assert d.read_splice is None  # withdrawn: not spliced
        e = await d.block_status(4 * MiB, 4096)  # no SEEK_DATA on devices: all data
        assert (e.length, e.status) == (4096, Status.DATA | Status.OFFSET_VALID)
        assert bytes(await d.read(0, 4096)) == b"\x5a" * 4096
        # may unmap; not "cheap": the kernel may emulate zeroing by writing zeros
        assert d.supported_zero_flags == ReqFlags.MAY_UNMAP
        await d.zero(0, 65536, ReqFlags.MAY_UNMAP)
        assert bytes(await d.read(0, 65536)) == bytes(65536)
        await d.zero(65536, 65536, ReqFlags.NONE)
        assert bytes(await d.read(65536, 65536)) == bytes(65536)
        await d.discard(131072 + 100, 65536)  # rounded inwards to sectors; contents undefined
        await d.write(MiB, b"\x77" * 4096, ReqFlags.FUA)
        await d.flush()
        assert bytes(await d.read(MiB, 4096)) == b"\x77" * 4096
        with pytest.raises(OSError) as info:
            await d.truncate(4 * MiB)
        assert info.value.errno == errno.ENOTSUP
    finally:
        await d.close()
    d = await open_driver(loop_device, direct=True)
    try:
        assert d.limits.request_alignment == 512
        assert bytes(await d.read(MiB, 4096)) == b"\x77" * 4096
    finally:
        await d.close()


# -- the event loop never waits for the disk ---------------------------------------------------
async def test_a_slow_disk_does_not_stall_the_event_loop(
    drv: FileDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocking calls wait for something only another trio task can provide: if they ran
    in the event loop's thread, that task could never run and they would time out."""
    import threading

    released = threading.Event()
    blocked_in = []
    real_preadv, real_pwritev, real_fallocate = os.preadv, os.pwritev, _file_sys.fallocate

    def disk(real: Any) -> Any:
        def slow(fd: int, *args: Any) -> Any:
            flags = args[2] if len(args) > 2 and real is not real_fallocate else 0
            if flags & os.RWF_NOWAIT:
                raise BlockingIOError(errno.EAGAIN, "would block")
            blocked_in.append(threading.current_thread() is threading.main_thread())
            if not released.wait(10):
                raise TimeoutError("the event loop was stalled")
            return real(fd, *args)

        return slow

    drv._rwf_nowait = os.RWF_NOWAIT  # as on a disk filesystem (the test image may be tmpfs)
    monkeypatch.setattr(file, "_preadv", disk(real_preadv))
    monkeypatch.setattr(file, "_pwritev", disk(real_pwritev))
    monkeypatch.setattr(_file_sys, "fallocate", disk(real_fallocate))

    async def request(fn: Any, *args: Any) -> None:
        await fn(*args)

    for fn, args in [
        (drv.read, (0, 4096)),
        (drv.write, (0, b"x" * 4096, ReqFlags.NONE)),
        (drv.zero, (0, 4096, ReqFlags.NONE)),
    ]:
        released.clear()
        assert drv.read_nowait(0, 4096) is None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, fn, *args)
            await trio.sleep(0)  # let the request start and block
            released.set()  # only possible because the loop is free
    assert blocked_in == [False, False, False]


async def test_block_status_remembers_the_last_data_extent(
    drv: FileDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeks = []
    real = os.lseek

    def counting(fd: int, pos: int, how: int) -> int:
        seeks.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting)
    first = await drv.block_status(0, 4096)
    n = len(seeks)
    for offset in range(4096, 65536, 4096):  # walking the data extent: no more lseek
        e = await drv.block_status(offset, 4096)
        assert (e.length, e.status) == (65536 - offset, first.status)
    assert len(seeks) == n
    await drv.discard(16384, 16384)  # forgets: the answer must change
    e = await drv.block_status(16384, 4096)
    assert e.status == Status.ZERO | Status.OFFSET_VALID and e.length == 16384
    e = await drv.block_status(4096, 4096)
    assert (e.length, e.status) == (12288, Status.DATA | Status.OFFSET_VALID)
    await drv.zero(0, 65536, ReqFlags.MAY_UNMAP)
    e = await drv.block_status(0, 4096)
    assert e.status == Status.ZERO | Status.OFFSET_VALID


async def test_direct_on_tmpfs_works_or_says_why() -> None:
    # tmpfs gained O_DIRECT in Linux 6.6; older kernels refuse it with EINVAL at open.
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = make_file(Path(tmp) / "img", MiB, {0: b"\x33" * 8192})
        try:
            d = await open_driver(path, direct=True)
        except GraphError as exc:
            assert "does not support O_DIRECT" in str(exc) and "cache.direct=off" in str(exc)
            return
        try:
            align = d.limits.request_alignment
            assert align >= 512 and align & (align - 1) == 0
            await d.write(align, b"\x44" * align, ReqFlags.NONE)
            assert bytes(await d.read(0, 2 * align)) == b"\x33" * align + b"\x44" * align
        finally:
            await d.close()
