"""Range locks over guest clusters.

Writes, zero-writes and discards hold the guest clusters they change for their whole
duration, so two writes into one unallocated cluster never both allocate it, and a cluster
is never freed under a write that is still filling it. Reads take no lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLocks:
    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` exclusively (units are the caller's: guest clusters)."""
        while True:
            for s, e, done in self._held:
                if s < end and start < e:
                    await done.wait()
                    break
            else:
                break
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()

    def busy(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e, _ in self._held)
