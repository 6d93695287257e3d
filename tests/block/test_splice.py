"""``Child.read_splice``: where a large read's bytes lie in a file in memory, so that a
connection thread sends them with ``sendfile``. Only a chain of generic edges down to a file
on a memory filesystem answers; a range that starts in a hole declines, so that a sparse read
still finds it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdserve.block import Child, Graph, Perm, open_graph
from nbdserve.block.drivers._file_sys import is_memory_fs

MiB = 1 << 20
RW = Perm.CONSISTENT_READ | Perm.WRITE
SHARE = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
DATA = bytes(range(256)) * 1024  # 256 KiB


@pytest.fixture
def shm() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        yield Path(tmp)


async def _raw_over_file(directory: Path, *, top: dict[str, Any] | None = None,
                         **file_opts: Any) -> tuple[Graph, Child]:
    """A 4 MiB sparse image with DATA at 1 MiB: the first MiB is a hole."""
    img = directory / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(DATA)
    graph = await open_graph([
        {"driver": "file", "node-name": "f", "filename": str(img), **file_opts},
        {"driver": "raw", "node-name": "r", "file": "f", **(top or {})},
    ])
    return graph, graph.attach("r", perm=RW, shared=SHARE, user="test")


async def test_raw_over_a_file_in_memory_says_where_the_bytes_are(shm: Path) -> None:
    graph, child = await _raw_over_file(shm)
    try:
        where = child.read_splice(MiB, len(DATA))
        assert where is not None
        fd, offset = where
        assert os.pread(fd, len(DATA), offset) == DATA
        for name in "rf":
            stats = graph.node(name).stats
            assert (stats.read_ops, stats.read_bytes) == (1, len(DATA))
    finally:
        await graph.close()


async def test_a_range_that_starts_in_a_hole_is_left_to_the_sparse_read(shm: Path) -> None:
    graph, child = await _raw_over_file(shm)
    try:
        assert child.read_splice(0, 2 * MiB) is None  # starts in the hole
        assert child.read_splice(3 * MiB, MiB) is None  # no data at or after it (ENXIO)
        assert child.read_splice(MiB + len(DATA) - 65536, 2 * 65536) is not None
        assert graph.node("r").stats.read_ops == 1
    finally:
        await graph.close()


@pytest.mark.parametrize("why", ["disk", "memory-driver", "direct", "copy-on-read", "window",
                                 "filter", "out-of-range"])
async def test_anything_else_declines(shm: Path, tmp_path: Path, why: str) -> None:
    offset, length = MiB, len(DATA)
    if why == "disk":  # sendfile from a disk file would block the thread on a miss
        graph, child = await _raw_over_file(tmp_path)
    elif why == "filter":  # a driver with reads of its own (here: error injection) decides
        graph, _ = await _raw_over_file(shm)
        await graph.add({"driver": "blkdebug", "node-name": "dbg", "image": "r"})
        child = graph.attach("dbg", perm=RW, shared=SHARE, user="test")
    elif why == "memory-driver":
        graph = await open_graph([{"driver": "memory", "node-name": "r", "size": 4 * MiB}])
        child = graph.attach("r", perm=RW, shared=SHARE, user="test")
    elif why == "direct":
        graph, child = await _raw_over_file(shm, **{"cache.direct": True})
    elif why == "copy-on-read":  # each read may write
        graph, child = await _raw_over_file(shm, top={"copy-on-read": True})
    elif why == "window":  # offsets shift: not a generic edge
        graph, child = await _raw_over_file(shm, top={"offset": 4096})
        offset -= 4096
    else:
        graph, child = await _raw_over_file(shm)
        offset = 4 * MiB - 4096
    if why == "disk":
        # Wherever tmp_path lives: a disk filesystem declines, one in memory answers.
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            in_memory = is_memory_fs(fd)
        finally:
            os.close(fd)
        try:
            assert (child.read_splice(offset, length) is not None) == in_memory
        finally:
            await graph.close()
        return
    try:
        assert child.read_splice(offset, length) is None
        assert graph.node("r").stats.read_ops == 0
    finally:
        await graph.close()
