"""Tracked write requests, so that a read-modify-write never loses a concurrent write.

An unaligned write reads the blocks around it, patches them and writes them back; a write
landing in that window would be overwritten with stale data. So a read-modify-write is
*serialising*: it waits for every overlapping in-flight write and holds back new ones until
it is done. Aligned writes only wait for serialising requests, and when none is in flight
(``serialising == 0``) the synchronous fast path skips all of this.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = ["TrackedRequest", "Tracker"]


class TrackedRequest:
    __slots__ = ("done", "end", "serialising", "start")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising
        #: Created by the first waiter: most requests finish with nobody waiting.
        self.done: trio.Event | None = None


class Tracker:
    __slots__ = ("requests", "serialising")

    def __init__(self) -> None:
        self.requests: list[TrackedRequest] = []
        #: Number of serialising requests in flight; 0 lets aligned writes skip the checks.
        self.serialising = 0

    def conflict(self, start: int, end: int, serialising: bool) -> TrackedRequest | None:
        for req in self.requests:
            if req.start < end and start < req.end and (serialising or req.serialising):
                return req
        return None

    async def begin(self, start: int, end: int, serialising: bool) -> TrackedRequest:
        # Waiters never hold a registration, so no wait cycle can form.
        while (other := self.conflict(start, end, serialising)) is not None:
            if other.done is None:
                other.done = trio.Event()
            await other.done.wait()
        return self.add(start, end, serialising)

    def add(self, start: int, end: int, serialising: bool) -> TrackedRequest:
        """Register a request that has checked :meth:`conflict` itself."""
        req = TrackedRequest(start, end, serialising)
        self.requests.append(req)
        if serialising:
            self.serialising += 1
        return req

    def end(
        self, req: TrackedRequest, run_soon: Callable[[Callable[[], object]], None] | None = None
    ) -> None:
        """Unregister ``req`` and wake its waiters; off the trio thread, ``run_soon`` must
        run the wake-up there."""
        self.requests.remove(req)
        if req.serialising:
            self.serialising -= 1
        if req.done is not None:
            if run_soon is None:
                req.done.set()
            else:
                run_soon(req.done.set)
