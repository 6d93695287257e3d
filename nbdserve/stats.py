"""Per-connection counters: plain integers on the hot path, one summary line at close."""

from __future__ import annotations

import time
from typing import Any

from protocol import Cmd


class ConnectionStats:
    __slots__ = ("bytes_read", "bytes_written", "errors", "requests", "started")

    def __init__(self) -> None:
        #: Requests by command value (unknown commands under their raw number).
        self.requests: dict[int, int] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.started = time.monotonic()

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
