"""Recycled, page-aligned read buffers.

Why aligned: the kernel copies page-cache data into the caller's buffer with ``rep movsb``,
which slows down up to tenfold when the destination sits just past a 4 KiB boundary relative
to the page-aligned source (4K aliasing). A ``bytearray`` from malloc starts 16 bytes into a
page, exactly the bad case: a 1 MiB ``preadv`` into one took ~450 µs here, into a page-aligned
buffer ~40 µs. O_DIRECT needs aligned memory anyway.

Why recycled: an aligned buffer comes from ``mmap`` (~13 µs), and a fresh large buffer pays
a page fault per page on first touch. Reusing buffers makes both free.

Ownership rule: ``take`` hands out a fresh ``memoryview`` of a pooled ``mmap``; the caller
owns it as long as it (or anything derived from it: slices, a socket send in progress) is
alive. Every view of the ``mmap`` keeps a reference to it, so the pool reuses a buffer only
when CPython's reference count says the pool's own references are the only ones left.

The pool is bounded: at most ``per_size`` buffers of one size, ``max_bytes`` in all, none
larger than ``max_size``. Beyond that ``take`` allocates a buffer that is not kept.
"""

from __future__ import annotations

import mmap
import sys
from collections import deque

_getrefcount = sys.getrefcount


def _free_count() -> int:
    """What getrefcount says of a buffer only the pool holds, seen the way ``take`` looks
    at it. Measured rather than written down (3 on CPython 3.11: the deque, the local and
    the argument) because interpreters that borrow references count differently, and a
    count too high would hand out a buffer still in use."""
    ring = deque([aligned(1)])
    buf = ring[0]
    return _getrefcount(buf)
#: How many pooled buffers ``take`` inspects before it allocates another one.
_PROBES = 4
#: Unpooled buffers smaller than this come from malloc: an mmap costs more than the copy
#: it might speed up (see the module doc).
_SMALL = 16 << 10


def aligned(length: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer of ``length`` > 0 bytes."""
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


_FREE = _free_count()


class BufferPool:
    def __init__(
        self,
        *,
        must_align: bool = False,
        max_bytes: int = 16 << 20,
        per_size: int = 32,
        max_size: int = 4 << 20,
    ) -> None:
        #: O_DIRECT: even a buffer outside the pool must be aligned.
        self.must_align = must_align
        self.max_bytes = max_bytes
        self.per_size = per_size
        self.max_size = max_size
        self._free: dict[int, deque[mmap.mmap]] = {}
        self._bytes = 0

    @property
    def pooled_bytes(self) -> int:
        return self._bytes

    def take(self, length: int) -> memoryview:
        """A writable buffer of ``length`` bytes with unspecified contents."""
        ring = self._free.get(length)
        if ring:
            # Requests mostly finish in order, so the oldest buffer is the likeliest free one.
            buf = ring[0]
            if _getrefcount(buf) == _FREE:
                return memoryview(buf)
        return self._take_slow(length, ring)

    def _take_slow(self, length: int, ring: deque[mmap.mmap] | None) -> memoryview:
        if ring is not None:
            for _ in range(min(len(ring), _PROBES)):
                ring.rotate(-1)
                buf = ring[0]
                if _getrefcount(buf) == _FREE:
                    return memoryview(buf)
            if len(ring) >= self.per_size:
                return self._unpooled(length)
        elif length > self.max_size or length <= 0:
            return self._unpooled(length)
        if self._bytes + length > self.max_bytes:
            return self._unpooled(length)
        buf = aligned(length)
        self._free.setdefault(length, deque()).appendleft(buf)
        self._bytes += length
        return memoryview(buf)

    def _unpooled(self, length: int) -> memoryview:
        if length >= _SMALL or (self.must_align and length > 0):
            return memoryview(aligned(length))
        return memoryview(bytearray(length))
