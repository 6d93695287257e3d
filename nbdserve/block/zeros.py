"""Zero bytes, shared: one immutable buffer that reads of holes slice (no allocation), and
the check for all-zero data (detect-zeroes here, sparse READ replies in the server)."""

from __future__ import annotations

from .types import Buffer

ZEROS_LEN = 1 << 20
_ZERO_BYTES = bytes(ZEROS_LEN)
ZEROS = memoryview(_ZERO_BYTES)


def zeros(length: int) -> bytes | memoryview:
    return ZEROS[:length] if length <= ZEROS_LEN else bytes(length)


def is_zero(data: Buffer) -> bool:
    """True if ``data`` is all zero bytes. Stops at the first non-zero byte, so data costs
    almost nothing; ``bytes.startswith`` compares with memcmp, memoryviews included."""
    view = memoryview(data)
    step = ZEROS_LEN
    return all(_ZERO_BYTES.startswith(view[i : i + step]) for i in range(0, view.nbytes, step))
