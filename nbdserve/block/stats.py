"""Per-node request statistics: plain integer counters, cheap enough for every request."""

from __future__ import annotations

import errno as _errno

__all__ = ["NodeStats"]


class NodeStats:
    """Completed requests and bytes per operation, and failures counted by errno name."""

    __slots__ = (
        "block_status_ops",
        "cache_ops",
        "copy_on_read_bytes",
        "discard_bytes",
        "discard_ops",
        "errors",
        "flush_ops",
        "flushes_skipped",
        "read_bytes",
        "read_ops",
        "rmw_ops",
        "write_bytes",
        "write_ops",
        "zero_bytes",
        "zero_ops",
    )

    def __init__(self) -> None:
        self.read_ops = 0
        self.read_bytes = 0
        self.write_ops = 0
        self.write_bytes = 0
        self.zero_ops = 0
        self.zero_bytes = 0
        self.discard_ops = 0
        self.discard_bytes = 0
        self.flush_ops = 0
        self.flushes_skipped = 0
        self.cache_ops = 0
        self.block_status_ops = 0
        #: Requests through the read-modify-write path (unaligned writes and zero edges).
        self.rmw_ops = 0
        #: Bytes copied up from the backing chain by copy-on-read.
        self.copy_on_read_bytes = 0
        #: Failed requests by errno name ("EIO", "ENOSPC", ...; "E?" when errno is unset).
        self.errors: dict[str, int] = {}

    def error(self, exc: OSError) -> None:
        code = exc.errno
        name = _errno.errorcode.get(code, f"E{code}") if code is not None else "E?"
        self.errors[name] = self.errors.get(name, 0) + 1

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["errors"] = dict(self.errors)
        return out
