"""Recycled read buffers, so a read does not pay for a fresh zero-filled allocation.

Ownership rule: a read hands its buffer to the caller, who may keep it as long as it likes
(the server sends it after the call returns, then drops it). The pool reuses a buffer only
when its own list holds the *only* reference: CPython's reference count tells us exactly
that. Any view of the buffer (a ``memoryview``, a slice of one, a socket send in progress)
references the buffer object, so a buffer somebody can still see is never handed out twice.

The pool is bounded: per size at most ``per_size`` buffers, at most ``max_bytes`` in all,
and no buffer larger than ``max_size``; anything beyond is allocated and forgotten as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B")

_getrefcount = sys.getrefcount
#: References of a free buffer seen from inside ``take``'s loop: the pool's list, the loop
#: variable and getrefcount's own argument.
_FREE = 3


class BufferPool(Generic[B]):
    def __init__(
        self,
        make: Callable[[int], B],
        *,
        max_bytes: int = 16 << 20,
        per_size: int = 8,
        max_size: int = 4 << 20,
    ) -> None:
        self._make = make
        self._free: dict[int, list[B]] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self.per_size = per_size
        self.max_size = max_size

    @property
    def pooled_bytes(self) -> int:
        return self._bytes

    def take(self, length: int) -> B:
        """A buffer of ``length`` bytes with unspecified contents, now owned by the caller."""
        bufs = self._free.get(length)
        if bufs is not None:
            for buf in bufs:
                if _getrefcount(buf) == _FREE:
                    return buf
            if len(bufs) >= self.per_size:
                return self._make(length)
        elif length > self.max_size:
            return self._make(length)
        buf = self._make(length)
        if self._bytes + length <= self.max_bytes:
            self._free.setdefault(length, []).append(buf)
            self._bytes += length
        return buf
