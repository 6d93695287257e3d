"""One shared, immutable zero buffer: reads of holes return slices of it, no allocation."""

from __future__ import annotations

ZEROS_LEN = 1 << 20
ZEROS = memoryview(bytes(ZEROS_LEN))


def zeros(length: int) -> bytes | memoryview:
    return ZEROS[:length] if length <= ZEROS_LEN else bytes(length)
