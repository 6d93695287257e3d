"""Send write-type commands to an export and print, as JSON, how each one was answered.

Run with Debian's /usr/bin/python3 (libnbd's `nbd` module). libnbd's strict mode is turned
off so the commands really reach the server instead of being refused inside libnbd.

usage: libnbd_readonly_probe.py URI
"""

import errno
import json
import sys
from collections.abc import Callable
from typing import Any

import nbd  # type: ignore[import-not-found]


def attempt(name: str, call: Callable[[], object]) -> dict[str, Any]:
    try:
        call()
    except nbd.Error as e:
        return {"command": name, "errno": errno.errorcode.get(e.errno or 0, str(e.errno)),
                "message": e.string}
    return {"command": name, "errno": None, "message": ""}


def main() -> None:
    uri = sys.argv[1]
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    results = {
        "is_read_only": bool(h.is_read_only()),
        "can_write_commands": {
            "trim": bool(h.can_trim()),
            "zero": bool(h.can_zero()),
        },
        "attempts": [
            attempt("write", lambda: h.pwrite(b"\xee" * 4096, 0)),
            attempt("write+fua", lambda: h.pwrite(b"\xee" * 512, 8192, nbd.CMD_FLAG_FUA)),
            attempt("write_zeroes", lambda: h.zero(4096, 65536)),
            attempt("trim", lambda: h.trim(4096, 131072)),
            attempt("read", lambda: h.pread(4096, 0)),
            attempt("flush", h.flush),
        ],
    }
    h.shutdown()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
