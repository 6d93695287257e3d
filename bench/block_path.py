"""Per-request cost of the block layer's request path, in process (no server, no sockets).

    python3 bench/block_path.py [--requests N] [--repeat R] [--dir DIR]

For a 4 KiB read it times, per request: a bare ``os.preadv`` into a preallocated buffer (the
floor), the file driver's own ``read_nowait`` (no generic layer), and ``Child.read_nowait``
through the generic path over a page-cached file and over a memory node; 4 KiB
``write_nowait`` on a memory node; and a null node with and without the generic layer,
which isolates the layer's own cost (no copy, no system call). Each figure is the best of R
runs of N requests at offsets spread over a 64 MiB image (rows take turns), so it shows the
path's own cost, not noise. The "overhead" column is the figure minus the bare ``preadv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import trio

from nbdserve.block import Perm, open_graph

IMAGE = 64 << 20
BLOCK = 4096


def best_ns(
    rows: list[tuple[str, Callable[[int], object]]], offsets: list[int], repeat: int
) -> list[tuple[str, float]]:
    """Best ns/request of each row; rows take turns, so a burst of load elsewhere on the
    machine hits them all alike."""
    best = {name: float("inf") for name, _ in rows}
    for _ in range(repeat):
        for name, fn in rows:
            start = time.perf_counter_ns()
            for off in offsets:
                fn(off)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / len(offsets))
    return [(name, best[name]) for name, _ in rows]


async def measure(requests: int, repeat: int, directory: str) -> list[tuple[str, float]]:
    step = IMAGE // BLOCK
    offsets = [(i * 7919 % step) * BLOCK for i in range(requests)]
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.write(fd, os.urandom(IMAGE))
        os.fsync(fd)
        buf = bytearray(BLOCK)
        bufs = [buf]
        for off in offsets[:step]:  # warm the page cache
            os.preadv(fd, bufs, off)
        graph = await open_graph(
            [
                {"driver": "file", "node-name": "f", "filename": path},
                {"driver": "memory", "node-name": "m", "size": IMAGE},
                {"driver": "null", "node-name": "n", "size": IMAGE},
            ]
        )
        try:
            file_child = graph.attach("f", perm=Perm.CONSISTENT_READ)
            mem = graph.attach("m", perm=Perm.CONSISTENT_READ | Perm.WRITE)
            null = graph.attach("n", perm=Perm.CONSISTENT_READ)
            data = os.urandom(BLOCK)
            for off in range(0, IMAGE, BLOCK):
                assert mem.write_nowait(off, data)
            file_read: Any = graph.node("f").driver
            null_read: Any = graph.node("n").driver
            misses = sum(file_child.read_nowait(o, BLOCK) is None for o in offsets[:1000])
            if misses:
                print(f"warning: {misses}/1000 file reads missed the page cache", file=sys.stderr)
            rows = best_ns(
                [
                    ("bare os.preadv (floor)", lambda o: os.preadv(fd, bufs, o)),
                    (
                        "file driver read_nowait (no generic layer)",
                        lambda o: file_read.read_nowait(o, BLOCK),
                    ),
                    (
                        "Child.read_nowait, file (page cache)",
                        lambda o: file_child.read_nowait(o, BLOCK),
                    ),
                    ("Child.read_nowait, memory", lambda o: mem.read_nowait(o, BLOCK)),
                    ("Child.write_nowait, memory", lambda o: mem.write_nowait(o, data)),
                    (
                        "null driver read_nowait (no generic layer)",
                        lambda o: null_read.read_nowait(o, BLOCK),
                    ),
                    ("Child.read_nowait, null", lambda o: null.read_nowait(o, BLOCK)),
                ],
                offsets,
                repeat,
            )
        finally:
            await graph.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the image goes (default: $TMPDIR)")
    args = parser.parse_args()
    rows = trio.run(measure, args.requests, args.repeat, args.dir)
    floor = rows[0][1]
    version = sys.version.split()[0]
    print(f"4 KiB requests, best of {args.repeat} x {args.requests}, Python {version}")
    print(f"{'path':46} {'µs/req':>8} {'overhead µs':>12}")
    for name, ns in rows:
        print(f"{name:46} {ns / 1000:8.3f} {(ns - floor) / 1000:12.3f}")


if __name__ == "__main__":
    main()
