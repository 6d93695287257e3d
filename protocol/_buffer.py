"""The receive buffer shared by every connection object."""

from __future__ import annotations

import struct
from typing import Any

from ._errors import LocalProtocolError

__all__: list[str] = []

# Consumed bytes are dropped lazily, once they are both numerous and the larger part of the
# buffer, so a run of small messages costs O(1) each and the buffer never holds more than
# about twice the unconsumed data.
_COMPACT_AT = 64 * 1024


class ReceiveBuffer:
    """Bytes received but not yet consumed, plus the peer's EOF.

    The connection objects only consume whole messages, so the buffer never holds more than
    one incomplete message beyond what the caller fed since the last ``next_event()``.
    """

    __slots__ = ("_buf", "_pos", "eof")

    def __init__(self, initial: bytes = b"") -> None:
        self._buf = bytearray(initial)
        self._pos = 0
        self.eof = False

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; ``b""`` records EOF."""
        if self.eof:
            raise LocalProtocolError("receive_data() called after EOF")
        if len(data) == 0:
            self.eof = True
        else:
            self._buf += data

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """Unpack ``fmt`` at the read position without consuming (caller checked length)."""
        return fmt.unpack_from(self._buf, self._pos)

    def skip(self, n: int) -> None:
        self._pos += n
        self._compact()

    def take(self, n: int) -> bytes:
        """Consume and return ``n`` bytes as an independent copy."""
        start = self._pos
        if start == 0 and n == len(self._buf):
            out = bytes(self._buf)
        else:
            with memoryview(self._buf) as view:
                out = bytes(view[start : start + n])
        self._pos = start + n
        self._compact()
        return out

    def take_into(self, dst: memoryview) -> int:
        """Consume up to ``len(dst)`` bytes by copying them into ``dst``; return how many."""
        start = self._pos
        n = min(len(dst), len(self._buf) - start)
        with memoryview(self._buf) as view:
            dst[:n] = view[start : start + n]
        self._pos = start + n
        self._compact()
        return n

    def take_all(self) -> bytes:
        return self.take(len(self))

    def _compact(self) -> None:
        pos = self._pos
        if pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif pos >= _COMPACT_AT and pos * 2 >= len(self._buf):
            del self._buf[:pos]
            self._pos = 0
