"""Per-request cost of the block layer's request path, in process (no server, no sockets).

    python3 bench/block_path.py [--requests N] [--repeat R] [--dir DIR]

For a 4 KiB read it times, per request: a bare ``os.preadv`` into a preallocated buffer (the
floor), the file driver's own ``read_nowait`` (no generic layer), and ``Child.read_nowait``
through the generic path over a page-cached file and over a memory node; plus 4 KiB
``write_nowait`` on a memory node. Each figure is the best of R runs of N requests at
offsets spread over a 64 MiB image, so it shows the path's own cost, not noise. The
"overhead" column is the figure minus the bare ``preadv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import trio

from nbdserve.block import Perm, open_graph

IMAGE = 64 << 20
BLOCK = 4096


def best_ns(fn: Callable[[int], object], offsets: list[int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for off in offsets:
            fn(off)
        best = min(best, (time.perf_counter_ns() - start) / len(offsets))
    return best


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
        rows = [
            ("bare os.preadv (floor)", best_ns(lambda o: os.preadv(fd, bufs, o), offsets, repeat))
        ]

        graph = await open_graph(
            [
                {"driver": "file", "node-name": "f", "filename": path},
                {"driver": "memory", "node-name": "m", "size": IMAGE},
            ]
        )
        try:
            file_child = graph.attach("f", perm=Perm.CONSISTENT_READ)
            mem = graph.attach("m", perm=Perm.CONSISTENT_READ | Perm.WRITE)
            data = os.urandom(BLOCK)
            for off in range(0, IMAGE, BLOCK):
                assert mem.write_nowait(off, data)
            drv_read = graph.node("f").driver.read_nowait  # type: ignore[attr-defined]
            misses = sum(file_child.read_nowait(o, BLOCK) is None for o in offsets[:1000])
            if misses:
                print(f"warning: {misses}/1000 file reads missed the page cache", file=sys.stderr)
            rows += [
                (
                    "file driver read_nowait (no generic layer)",
                    best_ns(lambda o: drv_read(o, BLOCK), offsets, repeat),
                ),
                (
                    "Child.read_nowait, file (page cache)",
                    best_ns(lambda o: file_child.read_nowait(o, BLOCK), offsets, repeat),
                ),
                (
                    "Child.read_nowait, memory",
                    best_ns(lambda o: mem.read_nowait(o, BLOCK), offsets, repeat),
                ),
                (
                    "Child.write_nowait, memory",
                    best_ns(lambda o: mem.write_nowait(o, data), offsets, repeat),
                ),
            ]
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
