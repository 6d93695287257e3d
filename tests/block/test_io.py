"""The generic request path, observed from the driver's side (``recording.py``): what it
passes down for padding, read-modify-write, splitting, flags, zero fallback, discard policy,
detect-zeroes and flush."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from nbdserve.block import Child, Graph, Perm, ReqFlags, open_graph
from nbdserve.block.tracking import Tracker

from .recording import RecordingDriver, register

RW = Perm.CONSISTENT_READ | Perm.WRITE
SIZE = 1 << 20


async def _open(
    monkeypatch: pytest.MonkeyPatch, **opts: Any
) -> tuple[Graph, Child, RecordingDriver]:
    register(monkeypatch)
    generic = {k: opts.pop(k) for k in ("discard", "detect-zeroes") if k in opts}
    size = opts.pop("size", SIZE)
    graph = await open_graph(
        [{"driver": "recording", "node-name": "d", "size": size, **generic, **opts}]
    )
    driver = graph.node("d").driver
    assert isinstance(driver, RecordingDriver)
    return graph, graph.attach("d", perm=RW), driver


async def test_unaligned_read_is_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, align=512)
    await child.write(0, bytes(range(256)) * 8)
    drv.calls.clear()
    assert bytes(await child.read(100, 700)) == (bytes(range(256)) * 8)[100:800]
    assert drv.ops("read") == [("read", 0, 1024, ReqFlags.NONE)]
    await graph.close()


async def test_unaligned_write_is_read_modify_write(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, align=4096)
    await child.write(0, b"\x11" * 8192)
    drv.calls.clear()
    await child.write(4000, b"\x22" * 200)
    assert [c[:3] for c in drv.calls] == [
        ("read", 0, 4096),
        ("read", 4096, 4096),
        ("write", 0, 8192),
    ]
    got = bytes(await child.read(0, 8192))
    assert got == b"\x11" * 4000 + b"\x22" * 200 + b"\x11" * 3992
    assert graph.node("d").stats.rmw_ops == 1
    await graph.close()


async def test_split_at_max_transfer_with_fua_on_last_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph, child, drv = await _open(monkeypatch, align=512, **{"max-transfer": 65536})
    await child.write(0, b"w" * 200_000, ReqFlags.FUA)
    writes = drv.ops("write")
    assert [w[2] for w in writes] == [65536, 65536, 65536, 3584]  # RMW pads the tail
    assert [bool(w[3] & ReqFlags.FUA) for w in writes] == [False, False, False, True]
    assert drv.flushes == 0
    drv.calls.clear()
    await child.read(0, 200_000)
    assert all(r[2] <= 65536 for r in drv.ops("read"))
    await graph.close()


async def test_fua_is_emulated_by_a_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, **{"native-fua": False})
    assert not child.caps.native_fua
    await child.write(0, b"x" * 10, ReqFlags.FUA)
    assert drv.ops("write")[-1][3] == ReqFlags.NONE
    assert drv.flushes == 1
    await graph.close()


async def test_flush_skipped_when_nothing_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch)
    await child.flush()
    assert drv.flushes == 0  # nothing written yet
    await child.write(0, b"x")
    await child.flush()
    await child.flush()
    assert drv.flushes == 1
    await child.zero(0, 4096)
    await child.flush()
    assert drv.flushes == 2
    assert graph.node("d").stats.flushes_skipped == 2
    await graph.close()


async def test_flush_recurses_into_written_children(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch)
    graph = await open_graph(
        [
            {"driver": "recording", "node-name": "f", "size": SIZE},
            {"driver": "raw", "node-name": "r", "file": "f"},
        ]
    )
    child = graph.attach("r", perm=RW)
    drv = graph.node("f").driver
    assert isinstance(drv, RecordingDriver)
    await child.write(5, b"abc")
    await child.flush()
    assert drv.flushes == 1
    await graph.close()


async def test_fast_zero_refused_before_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, **{"fast-zero": False})
    assert not child.caps.can_fast_zero
    with pytest.raises(OSError) as info:
        await child.zero(0, 65536, ReqFlags.NO_FALLBACK)
    assert info.value.errno == errno.ENOTSUP
    assert drv.calls == []
    await graph.close()


async def test_fast_zero_refused_when_misaligned(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, align=4096)
    assert child.caps.can_fast_zero
    with pytest.raises(OSError) as info:
        await child.zero(100, 4096, ReqFlags.NO_FALLBACK)
    assert info.value.errno == errno.ENOTSUP
    assert drv.calls == []
    await child.zero(4096, 8192, ReqFlags.NO_FALLBACK)
    assert drv.ops("zero") == [("zero", 4096, 8192, ReqFlags.NO_FALLBACK)]
    await graph.close()


async def test_zero_falls_back_to_bounded_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 3 * SIZE
    graph, child, drv = await _open(monkeypatch, size=size, **{"can-zero": False})
    await child.write(0, b"\xff" * size)
    drv.calls.clear()
    await child.zero(0, size - 1)
    writes = drv.ops("write")
    assert [w[2] for w in writes] == [1 << 20, 1 << 20, (1 << 20) - 1]
    assert bytes(await child.read(0, size)) == bytes(size - 1) + b"\xff"
    await graph.close()


async def test_zero_enotsup_from_driver_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, **{"zero-enotsup": True, "max-zero": 65536})
    await child.write(0, b"\xff" * 200_000)
    drv.calls.clear()
    await child.zero(0, 200_000)
    assert [z[2] for z in drv.ops("zero")] == [65536, 65536, 65536, 3392]
    assert bytes(await child.read(0, 200_000)) == bytes(200_000)
    with pytest.raises(OSError) as info:
        await child.zero(0, 4096, ReqFlags.NO_FALLBACK)
    assert info.value.errno == errno.ENOTSUP
    await graph.close()


@pytest.mark.parametrize("policy", ["ignore", "unmap"])
async def test_may_unmap_and_discard_follow_the_policy(
    monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    graph, child, drv = await _open(monkeypatch, discard=policy)
    await child.zero(0, 4096, ReqFlags.MAY_UNMAP)
    assert bool(drv.ops("zero")[0][3] & ReqFlags.MAY_UNMAP) == (policy == "unmap")
    await child.discard(0, 65536)
    assert len(drv.ops("discard")) == (1 if policy == "unmap" else 0)
    assert child.caps.can_discard == (policy == "unmap")
    await graph.close()


async def test_discard_sends_only_aligned_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch, discard="unmap", align=4096)
    await child.discard(100, 3 * 4096)
    assert drv.ops("discard") == [("discard", 4096, 8192, ReqFlags.NONE)]
    await child.discard(100, 200)  # no whole block: nothing to do
    assert len(drv.ops("discard")) == 1
    await graph.close()


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
async def test_detect_zeroes(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    graph, child, drv = await _open(monkeypatch, **{"detect-zeroes": mode, "discard": "unmap"})
    await child.write(0, bytes(8192))
    await child.write(8192, b"\x01" + bytes(8191))
    zeros = drv.ops("zero")
    if mode == "off":
        assert zeros == []
    else:
        assert [z[1:3] for z in zeros] == [(0, 8192)]
        assert bool(zeros[0][3] & ReqFlags.MAY_UNMAP) == (mode == "unmap")
    assert len(drv.ops("write")) == (2 if mode == "off" else 1)
    await graph.close()


async def test_write_unchanged_needs_only_that_permission(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph, _, _drv = await _open(monkeypatch)
    cor = graph.attach("d", perm=Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED, user="cor")
    await cor.write(0, b"same", ReqFlags.WRITE_UNCHANGED)
    with pytest.raises(OSError) as info:
        await cor.write(0, b"new!")
    assert info.value.errno == errno.EPERM
    await graph.close()


async def _concurrent_unaligned_writes(graph: Graph, child: Child) -> bytes:
    # 64 one-byte writes into the same 4 KiB block, all in flight at once: each must do a
    # read-modify-write of that block, and none may overwrite another's byte.
    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(child.write, 1000 + i * 37, bytes([i + 1]))
    return bytes(await child.read(0, 4096))


def _expected() -> bytes:
    block = bytearray(4096)
    for i in range(64):
        block[1000 + i * 37] = i + 1
    return bytes(block)


async def _blkdebug_graph() -> tuple[Graph, Child]:
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "m", "size": SIZE},
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": "m",
                "align": 4096,
                # Every read and write yields to the scheduler, so the requests interleave.
                "inject-delay": [{"iotype": ["read", "write"], "ms": 0}],
            },
        ]
    )
    return graph, graph.attach("d", perm=RW)


async def test_concurrent_overlapping_rmw_loses_nothing() -> None:
    graph, child = await _blkdebug_graph()
    assert await _concurrent_unaligned_writes(graph, child) == _expected()
    assert graph.node("d").stats.rmw_ops == 64
    await graph.close()


async def test_without_serialisation_the_same_workload_loses_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control experiment: proves the test above can fail.
    async def no_wait(self: Tracker, start: int, end: int, serialising: bool) -> Any:
        from nbdserve.block.tracking import TrackedRequest

        req = TrackedRequest(start, end, False)
        self.requests.append(req)
        return req

    monkeypatch.setattr(Tracker, "begin", no_wait)
    graph, child = await _blkdebug_graph()
    assert await _concurrent_unaligned_writes(graph, child) != _expected()
    await graph.close()


async def test_aligned_write_waits_for_overlapping_rmw() -> None:
    graph, child = await _blkdebug_graph()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(child.write, 10, b"\x01")  # RMW of block 0
        await trio.sleep(0)
        # While the RMW is in flight the fast path must not write around it...
        assert child.write_nowait(0, b"\x02" * 4096) is False
        nursery.start_soon(child.write, 0, b"\x02" * 4096)  # ...and this one waits for it
    got = bytes(await child.read(0, 4096))
    assert got == b"\x02" * 4096
    await graph.close()


async def test_zero_fua_native_or_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, child, drv = await _open(monkeypatch)
    await child.zero(0, 8192, ReqFlags.FUA)
    assert drv.ops("zero")[-1][3] & ReqFlags.FUA and drv.flushes == 0
    await child.zero(1, 8192, ReqFlags.FUA)  # unaligned on a 1-aligned node: still native
    assert drv.flushes == 0
    await graph.close()
    # The driver refuses: the fallback writes carry no FUA, so a flush follows.
    graph, child, drv = await _open(monkeypatch, **{"zero-enotsup": True})
    await child.write(0, b"\xff" * 8192)
    await child.zero(0, 8192, ReqFlags.FUA)
    assert drv.flushes == 1
    await graph.close()
