"""``Child.read_unlocked`` and ``write_unlocked``: a large request from a connection thread
copied out of or into the file with the graph lock let go. Only a chain of generic edges down
to the file driver takes them; while the lock is away a write is registered with every tracker
on the way, so a read-modify-write arriving meanwhile waits for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from nbdserve.block import Child, Graph, Perm, open_graph

MiB = 1 << 20
RW = Perm.CONSISTENT_READ | Perm.WRITE
SHARE = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
DATA = b"\x5a" * (256 << 10)


class FakeUnlock:
    """Stands in for the connection thread's Unlocker and looks around inside the window."""

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.entered = 0
        self.inside = False
        self.during = during
        self.soon: list[Callable[[], object]] = []

    def __enter__(self) -> None:
        assert not self.inside
        self.entered += 1
        self.inside = True
        self.during()

    def __exit__(self, *exc_info: object) -> None:
        self.inside = False

    def run_soon(self, fn: Callable[[], object]) -> None:
        assert not self.inside  # wake-ups are handed over with the lock taken back
        self.soon.append(fn)


async def _raw_over_file(tmp_path: Path, **file_opts: Any) -> tuple[Graph, Child]:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    graph = await open_graph([
        {"driver": "file", "node-name": "f", "filename": str(img), **file_opts},
        {"driver": "raw", "node-name": "r", "file": "f"},
    ])
    return graph, graph.attach("r", perm=RW, shared=SHARE, user="test")


async def test_raw_over_file_writes_with_the_lock_let_go(tmp_path: Path) -> None:
    graph, child = await _raw_over_file(tmp_path)
    trackers = [graph.node("r")._tracker, graph.node("f")._tracker]

    def registered() -> None:
        # A read-modify-write starting now, on either node, would see the write and wait.
        for tracker in trackers:
            assert tracker.conflict(MiB, MiB + 1, True) is not None

    unlock = FakeUnlock(registered)
    try:
        assert child.write_unlocked(MiB, DATA, unlock)
        assert unlock.entered == 1
        assert all(not t.requests for t in trackers)
        assert bytes(await child.read(MiB, len(DATA))) == DATA
        for name in "rf":
            stats = graph.node(name).stats
            assert (stats.write_ops, stats.write_bytes) == (1, len(DATA))
    finally:
        await graph.close()
    assert (tmp_path / "disk.img").read_bytes()[MiB : MiB + len(DATA)] == DATA


async def test_a_waiter_is_woken_on_the_trio_thread(tmp_path: Path) -> None:
    graph, child = await _raw_over_file(tmp_path)
    tracker = graph.node("r")._tracker
    waiting = trio.Event()

    def a_waiter_arrives() -> None:  # as Tracker.begin() does for a conflicting request
        (req,) = tracker.requests
        req.done = waiting

    unlock = FakeUnlock(a_waiter_arrives)
    try:
        assert child.write_unlocked(0, DATA, unlock)
        assert not waiting.is_set() and unlock.soon == [waiting.set]
    finally:
        await graph.close()


@pytest.mark.parametrize("why", ["memory", "read-only", "direct", "filter", "serialising",
                                 "out-of-range", "detect-zeroes"])
async def test_anything_else_declines_without_letting_go(tmp_path: Path, why: str) -> None:
    if why == "memory":
        graph = await open_graph([{"driver": "memory", "node-name": "r", "size": 4 * MiB}])
        child = graph.attach("r", perm=RW, shared=SHARE, user="test")
    elif why == "read-only":
        graph, _ = await _raw_over_file(tmp_path)
        child = graph.attach("r", perm=Perm.CONSISTENT_READ, shared=SHARE, user="reader")
    elif why == "direct":
        graph, child = await _raw_over_file(tmp_path, **{"cache.direct": True})
    elif why == "detect-zeroes":  # every write must be looked at first
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(4 * MiB))
        graph = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)},
                                  {"driver": "raw", "node-name": "r", "file": "f",
                                   "detect-zeroes": "on"}])
        child = graph.attach("r", perm=RW, shared=SHARE, user="test")
    elif why == "filter":  # a driver with a write_nowait of its own stays under the lock
        graph, _ = await _raw_over_file(tmp_path)
        await graph.add({"driver": "blkdebug", "node-name": "dbg", "image": "r"})
        child = graph.attach("dbg", perm=RW, shared=SHARE, user="test")
    else:
        graph, child = await _raw_over_file(tmp_path)
        if why == "serialising":
            graph.node("f")._tracker.add(MiB, MiB + 1, True)  # an RMW in flight below
    offset = 4 * MiB - 4096 if why == "out-of-range" else MiB
    unlock = FakeUnlock()
    try:
        assert not child.write_unlocked(offset, DATA, unlock)
        assert unlock.entered == 0
    finally:
        await graph.close()


async def test_the_file_driver_leaves_writes_over_1_mib_to_its_thread_pool(
    tmp_path: Path,
) -> None:
    # Several of those from one connection overlap there; on the connection thread they
    # would be copied one after the other.
    graph, child = await _raw_over_file(tmp_path)
    big = b"\x77" * (2 * MiB)
    unlock = FakeUnlock()
    try:
        assert not child.write_unlocked(0, big, unlock)
        assert child.read_unlocked(0, len(big), unlock) is None
        assert unlock.entered == 0
        assert not graph.node("r")._tracker.requests and not graph.node("f")._tracker.requests
        assert graph.node("r").stats.write_ops == 0
        assert bytes(await child.read(0, 4096)) == bytes(4096)
    finally:
        await graph.close()


async def test_raw_over_file_reads_with_the_lock_let_go(tmp_path: Path) -> None:
    graph, child = await _raw_over_file(tmp_path)
    unlock = FakeUnlock()
    try:
        await child.write(MiB, DATA)
        buf = child.read_unlocked(MiB, len(DATA), unlock)
        assert buf is not None and bytes(buf) == DATA
        assert unlock.entered == 1
        for name in "rf":
            stats = graph.node(name).stats
            assert (stats.read_ops, stats.read_bytes) == (1, len(DATA))
    finally:
        await graph.close()


@pytest.mark.parametrize("why", ["memory", "direct", "copy-on-read", "out-of-range"])
async def test_reads_anywhere_else_decline_without_letting_go(tmp_path: Path, why: str) -> None:
    if why == "memory":
        graph = await open_graph([{"driver": "memory", "node-name": "r", "size": 4 * MiB}])
        child = graph.attach("r", perm=RW, shared=SHARE, user="test")
    elif why == "direct":
        graph, child = await _raw_over_file(tmp_path, **{"cache.direct": True})
    elif why == "copy-on-read":  # each read may write: never without the lock
        graph, _ = await _raw_over_file(tmp_path)
        await graph.add({"driver": "raw", "node-name": "cor", "file": "r",
                         "copy-on-read": True})
        child = graph.attach("cor", perm=RW, shared=SHARE, user="test")
    else:
        graph, child = await _raw_over_file(tmp_path)
    offset = 4 * MiB - 4096 if why == "out-of-range" else MiB
    unlock = FakeUnlock()
    try:
        assert child.read_unlocked(offset, len(DATA), unlock) is None
        assert unlock.entered == 0
    finally:
        await graph.close()
