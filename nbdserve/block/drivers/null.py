"""``null`` (alias ``null-co``): a disk that stores nothing, like qemu's null-co.

Options: ``size`` (default 1G), ``read-zeroes`` (default on), ``latency-ns`` (default 0,
added to every request). Writes, zero-writes and discards are dropped; flush does nothing.

Reads return zeros either way -- Python gives no uninitialised buffers -- but only with
``read-zeroes=on`` does block status promise it (ZERO); with it off, as in qemu, the status
is "neither data nor zero" and callers must not rely on the contents. Unlike qemu, reads
default to zeroes: a safe default.
"""

from __future__ import annotations

from typing import Any, ClassVar

import trio

from ..driver import Driver, Opt
from ..types import Buffer, Extent, ReqFlags, Status
from ..zeros import zeros

__all__ = ["NullDriver"]


class NullDriver(Driver):
    name = "null"
    options: ClassVar[dict[str, Opt]] = {
        "size": Opt("size", 1 << 30, "disk size"),
        "read-zeroes": Opt(bool, True, "block status promises that reads return zeros"),
        "latency-ns": Opt(int, 0, "delay added to every request, in nanoseconds"),
    }
    supported_write_flags = ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED
    supported_zero_flags = ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        self._size: int = opts["size"]
        self._read_zeroes: bool = opts["read-zeroes"]
        if opts["latency-ns"] < 0:
            raise ValueError("latency-ns must not be negative")
        self._latency = opts["latency-ns"] / 1e9

    def length(self) -> int:
        return self._size

    async def _delay(self) -> None:
        if self._latency:
            await trio.sleep(self._latency)

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return None if self._latency else zeros(length)

    async def read(self, offset: int, length: int) -> Buffer:
        await self._delay()
        return zeros(length)

    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        return not self._latency

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        await self._delay()

    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._delay()

    async def discard(self, offset: int, length: int) -> None:
        await self._delay()

    async def flush(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> Extent:
        status = Status.OFFSET_VALID | (Status.ZERO if self._read_zeroes else Status.NONE)
        return Extent(self._size - offset, status, offset, self.node)

    async def truncate(self, length: int) -> None:
        self._size = length
