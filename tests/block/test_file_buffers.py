"""The read-buffer pool of the ``file`` driver: reuse only what nobody can see any more."""

from __future__ import annotations

import ctypes
import mmap

from nbdserve.block.buffers import BufferPool


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_buffers_are_page_aligned_writable_and_sized() -> None:
    pool = BufferPool()
    for length in (1, 512, 4096, 65536, 1 << 20):
        view = pool.take(length)
        assert len(view) == length and not view.readonly
        assert address(view) % mmap.PAGESIZE == 0
        view[-1] = 7


def test_a_buffer_is_reused_only_when_every_view_is_gone() -> None:
    pool = BufferPool()
    a = pool.take(4096)
    a_id = id(a.obj)
    b = pool.take(4096)
    assert b.obj is not a.obj
    part = a[10:20]
    del a
    c = pool.take(4096)
    assert id(c.obj) != a_id  # a slice still sees it
    del part
    d = pool.take(4096)
    assert id(d.obj) == a_id
    assert pool.pooled_bytes == 3 * 4096


def test_the_pool_is_bounded() -> None:
    pool = BufferPool(per_size=2, max_bytes=3 * 4096, max_size=8192)
    held = [pool.take(4096) for _ in range(4)]  # two pooled, two beyond the per-size limit
    assert pool.pooled_bytes == 2 * 4096
    held += [pool.take(8192)]  # would pass max_bytes: not kept
    held += [pool.take(16384)]  # larger than max_size: not kept
    assert pool.pooled_bytes == 2 * 4096
    # Small unpooled buffers need no alignment; O_DIRECT ones do.
    assert isinstance(held[3].obj, bytearray)
    assert isinstance(BufferPool(must_align=True, max_bytes=0).take(512).obj, mmap.mmap)
    assert len({id(v.obj) for v in held}) == len(held)


def test_busy_buffers_are_skipped_in_rotation() -> None:
    pool = BufferPool()
    views = [pool.take(4096) for _ in range(3)]
    ids = [id(v.obj) for v in views]
    del views[1]  # the middle one comes free, the oldest is still busy
    again = pool.take(4096)
    assert id(again.obj) == ids[1]
