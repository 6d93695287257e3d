"""Per-connection counters: plain integers on the hot path, one summary line at close."""

from __future__ import annotations

import time
from typing import Any

from protocol import Cmd

_KNOWN = max(Cmd) + 1


class ConnectionStats:
    __slots__ = ("bytes_read", "bytes_written", "counts", "errors", "other", "started")

    def __init__(self) -> None:
        #: Valid requests by command value (a list: indexing it is cheaper than a dict).
        self.counts = [0] * _KNOWN
        #: Requests refused by validation, by raw command value.
        self.other: dict[int, int] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.started = time.monotonic()

    def count_other(self, cmd: int) -> None:
        cmd = int(cmd)
        self.other[cmd] = self.other.get(cmd, 0) + 1

    @property
    def requests(self) -> dict[int, int]:
        """Every request by command value."""
        total = {cmd: n for cmd, n in enumerate(self.counts) if n}
        for cmd, n in self.other.items():
            total[cmd] = total.get(cmd, 0) + n
        return total

    def summary(self) -> dict[str, Any]:
        by_name = {}
        for cmd, count in sorted(self.requests.items()):
            try:
                name = Cmd(cmd).name.lower()
            except ValueError:
                name = f"cmd{cmd}"
            by_name[name] = count
        return {
            "requests": by_name,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "duration": round(time.monotonic() - self.started, 3),
        }
