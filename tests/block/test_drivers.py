"""Behaviour specific to the memory, null, raw and blkdebug drivers (the shared contract is
in test_contract.py)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from nbdserve.block import GraphError, Perm, ReqFlags, Status, open_graph
from nbdserve.block.drivers.blkdebug import BlkdebugDriver
from nbdserve.block.drivers.memory import PAGE_SIZE, MemoryDriver

RW = Perm.CONSISTENT_READ | Perm.WRITE
M = 1 << 20


# -- memory ---------------------------------------------------------------------------------


async def test_memory_is_sparse_and_discard_frees() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1G,discard=unmap"])
    child = graph.attach("m", perm=RW)
    drv = graph.node("m").driver
    assert isinstance(drv, MemoryDriver)
    assert drv.allocated_bytes == 0
    await child.write(5 * M, b"x" * (3 * PAGE_SIZE))
    assert drv.allocated_bytes == 3 * PAGE_SIZE
    await child.discard(5 * M, 2 * PAGE_SIZE + 100)
    assert drv.allocated_bytes == PAGE_SIZE
    assert bytes(await child.read(5 * M, 2 * PAGE_SIZE)) == bytes(2 * PAGE_SIZE)
    await child.zero(5 * M, 3 * PAGE_SIZE, ReqFlags.MAY_UNMAP)
    assert drv.allocated_bytes == 0
    [ext] = await child.block_status(0, 1 << 30)
    assert ext.status == Status.ZERO | Status.EOF
    await graph.close()


async def test_memory_reads_in_recycled_buffers_show_no_stale_bytes() -> None:
    # Reads that span pages are assembled in pooled buffers: holes, and the zeroed pages of
    # an overlay, must be written as zeros, not left as a previous read's bytes.
    graph = await open_graph(["driver=memory,node-name=plain,size=4M",
                              "driver=memory,node-name=base,size=4M",
                              "driver=memory,node-name=top,backing=base,size=4M"])
    plain = graph.attach("plain", perm=RW)
    base = graph.attach("base", perm=RW, user="base writer")
    top = graph.attach("top", perm=RW)
    await plain.write(0, b"\xff" * M)
    await base.write(0, b"B" * M)
    await top.write(M, b"\xff" * M)
    await top.zero(PAGE_SIZE, PAGE_SIZE)  # hides a backing page
    hidden = b"B" * PAGE_SIZE + bytes(PAGE_SIZE) + b"B" * (M - 2 * PAGE_SIZE)
    for _ in range(3):
        full = plain.read_nowait(0, M)  # fills the pooled buffer with 0xff
        assert full is not None and bytes(full) == b"\xff" * M
        del full
        mixed = plain.read_nowait(M - PAGE_SIZE, M)  # one page of data, then a hole
        assert mixed is not None and bytes(mixed) == b"\xff" * PAGE_SIZE + bytes(M - PAGE_SIZE)
        del mixed
        full = top.read_nowait(M, M)
        assert full is not None and bytes(full) == b"\xff" * M
        del full
        assert bytes(await top.read(0, M)) == hidden
    await graph.close()


async def test_memory_overlay_copy_on_write() -> None:
    graph = await open_graph(
        [
            "driver=memory,node-name=base,size=1M",
            "driver=memory,node-name=top,backing=base,discard=unmap",
        ]
    )
    base = graph.attach("base", perm=RW, user="base writer")
    await base.write(0, b"B" * M)
    top = graph.attach("top", perm=RW)
    assert top.size == M  # size taken from the backing node
    await top.write(PAGE_SIZE + 10, b"t")  # partial page: copied up first
    assert bytes(await top.read(PAGE_SIZE + 9, 3)) == b"BtB"
    await top.zero(2 * PAGE_SIZE, PAGE_SIZE)  # hides the backing data
    assert bytes(await top.read(2 * PAGE_SIZE, PAGE_SIZE)) == bytes(PAGE_SIZE)
    # Nothing reached the backing node.
    assert bytes(await base.read(0, M)) == b"B" * M
    # Discard in an overlay lets the backing data show through again.
    await top.discard(PAGE_SIZE, 2 * PAGE_SIZE)
    assert bytes(await top.read(PAGE_SIZE, 2 * PAGE_SIZE)) == b"B" * (2 * PAGE_SIZE)
    depths = await top.allocation_depth(0, M)
    assert {e.depth for e in depths} == {2}
    await graph.close()


async def test_memory_truncate() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M"])
    child = graph.attach("m", perm=RW | Perm.RESIZE)
    await child.write(M - 10, b"z" * 10)
    await child.truncate(M - 5)
    await child.truncate(M)
    assert bytes(await child.read(M - 10, 10)) == b"z" * 5 + bytes(5)
    await graph.close()


# -- null -----------------------------------------------------------------------------------


async def test_null_drops_writes_and_reads_zeros() -> None:
    graph = await open_graph(["driver=null-co,node-name=n,size=64K"])
    child = graph.attach("n", perm=RW)
    assert child.size == 65536
    await child.write(0, b"gone")
    assert bytes(await child.read(0, 4)) == bytes(4)
    assert child.caps.native_fua and child.caps.can_fast_zero
    await graph.close()


async def test_null_latency_forces_the_async_path() -> None:
    graph = await open_graph(["driver=null,node-name=n,size=64K,latency-ns=1000000"])
    child = graph.attach("n", perm=RW)
    assert child.read_nowait(0, 4096) is None
    assert child.write_nowait(0, b"x" * 4096) is False
    assert bytes(await child.read(0, 4096)) == bytes(4096)
    await graph.close()


# -- raw ------------------------------------------------------------------------------------


async def test_raw_window_maps_into_the_file() -> None:
    graph = await open_graph(
        [
            "driver=memory,node-name=f,size=1M",
            "driver=raw,node-name=r,file=f,offset=100K,size=200K",
        ]
    )
    r = graph.attach("r", perm=RW)
    f = graph.attach("f", perm=Perm.CONSISTENT_READ, user="file reader")
    assert r.size == 200 * 1024
    await r.write(0, b"head")
    await r.write(r.size - 4, b"tail")
    assert bytes(await f.read(100 * 1024, 4)) == b"head"
    assert bytes(await f.read(300 * 1024 - 4, 4)) == b"tail"
    with pytest.raises(OSError) as info:
        await r.write(r.size - 2, b"over")
    assert info.value.errno == errno.EINVAL
    resizer = graph.attach("r", perm=RW | Perm.RESIZE, user="resizer")
    with pytest.raises(OSError) as info:
        await resizer.truncate(M)
    assert info.value.errno == errno.ENOTSUP
    await graph.close()


async def test_raw_without_size_follows_the_file() -> None:
    graph = await open_graph(
        ["driver=memory,node-name=f,size=1M", "driver=raw,node-name=r,file=f,offset=4K"]
    )
    r = graph.attach("r", perm=RW | Perm.RESIZE)
    await r.truncate(M)
    assert graph.node("f").size == M + 4096 and r.size == M
    await graph.close()


async def test_two_raw_windows_share_one_writable_file() -> None:
    graph = await open_graph(
        [
            "driver=memory,node-name=disk,size=2M",
            "driver=raw,node-name=p1,file=disk,offset=0,size=1M",
            "driver=raw,node-name=p2,file=disk,offset=1M,size=1M",
        ]
    )
    one, two = graph.attach("p1", perm=RW), graph.attach("p2", perm=RW)
    await one.write(0, b"1")
    await two.write(0, b"2")
    disk = graph.attach("disk")
    assert bytes(await disk.read(0, 1)) + bytes(await disk.read(M, 1)) == b"12"
    await graph.close()


# -- blkdebug -------------------------------------------------------------------------------


async def _debug(**opts: Any) -> tuple[Any, Any]:
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "m", "size": M},
            {"driver": "blkdebug", "node-name": "d", "image": "m", **opts},
        ]
    )
    return graph, graph.attach("d", perm=RW)


async def test_blkdebug_error_in_a_range_always() -> None:
    graph, child = await _debug(
        **{"inject-error": [{"errno": "ENOSPC", "iotype": "write", "offset": 8192, "length": 4096}]}
    )
    await child.write(0, b"x" * 8192)  # ends where the range starts: passes
    for _ in range(2):
        with pytest.raises(OSError) as info:
            await child.write(12287, b"x")
        assert info.value.errno == errno.ENOSPC
    await child.read(8192, 4096)  # reads are not affected
    assert graph.node("d").stats.errors == {"ENOSPC": 2}
    await graph.close()


async def test_blkdebug_once_and_after() -> None:
    graph, child = await _debug(**{"inject-error": [{"iotype": "read", "after": 2, "once": True}]})
    await child.read(0, 10)
    await child.read(0, 10)
    with pytest.raises(OSError) as info:
        await child.read(0, 10)
    assert info.value.errno == errno.EIO
    await child.read(0, 10)
    await graph.close()


@pytest.mark.parametrize("op", ["flush", "zero", "discard", "block-status"])
async def test_blkdebug_other_iotypes(op: str) -> None:
    graph, child = await _debug(**{"inject-error": [{"iotype": op, "errno": 5, "once": True}]})
    calls = {
        "flush": lambda: child.flush(),
        "zero": lambda: child.zero(0, 4096),
        "discard": lambda: child.discard(0, 4096),
        "block-status": lambda: child.block_status(0, 4096),
    }
    if op == "discard":
        graph.node("d").discard = "unmap"
    await child.write(0, b"dirty")  # so that flush has work to do
    with pytest.raises(OSError) as info:
        await calls[op]()
    assert info.value.errno == errno.EIO
    await graph.close()


async def test_blkdebug_delay_and_runtime_rules() -> None:
    graph, child = await _debug(**{"inject-delay": [{"iotype": "read", "ms": 20}]})
    start = trio.current_time()
    await child.read(0, 10)
    assert trio.current_time() - start >= 0.02
    drv = graph.node("d").driver
    assert isinstance(drv, BlkdebugDriver)
    drv.add_error(iotype="write", errno="EROFS", once=True)
    with pytest.raises(OSError) as info:
        await child.write(0, b"x")
    assert info.value.errno == errno.EROFS
    await graph.close()


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"iotype": "teleport"}, "inject-error.0.iotype"),
        ({"offset": "x"}, "inject-error.0.offset"),
        ({"colour": "red"}, "inject-error.0.colour"),
        ({"after": -1}, "inject-error.0.after"),
    ],
)
async def test_blkdebug_bad_rules(rule: dict[str, Any], key: str) -> None:
    with pytest.raises(GraphError, match=f"'d', option '{key}'"):
        await _debug(**{"inject-error": [rule]})


async def test_blkdebug_align_must_be_a_power_of_two() -> None:
    with pytest.raises(GraphError, match="'align'"):
        await _debug(align=3000)


async def test_alignment_larger_than_the_image_tail() -> None:
    # 1000 bytes, 512-byte alignment: the last block runs past the end of the image.
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "m", "size": 1000},
            {"driver": "blkdebug", "node-name": "d", "image": "m", "align": 512},
        ]
    )
    child = graph.attach("d", perm=RW)
    await child.write(990, b"0123456789")
    assert bytes(await child.read(985, 15)) == bytes(5) + b"0123456789"
    extents = await child.block_status(600, 400)
    assert sum(e.length for e in extents) == 400 and extents[-1].status & Status.EOF
    await graph.close()


# -- copy-on-read (a generic node option) ---------------------------------------------------


async def _cor_graph(top: str) -> Any:
    graph = await open_graph(["driver=memory,node-name=base,size=1M", top])
    base = graph.attach("base", perm=RW, user="base writer")
    await base.write(0, bytes(range(256)) * 4096)
    base.detach()
    return graph


async def test_copy_on_read_fills_the_overlay() -> None:
    graph = await _cor_graph("driver=memory,node-name=top,backing=base,copy-on-read=on")
    top = graph.attach("top")
    assert top.read_nowait(0, 10) is None  # copy-on-read always takes the async path
    assert bytes(await top.read(100_000, 10)) == (bytes(range(256)) * 4096)[100_000:100_010]
    # The 64 KiB granule around the read is now allocated in the overlay.
    depths = [(e.length, e.depth) for e in await top.allocation_depth(0, 4 * 65536)]
    assert depths == [(65536, 2), (65536, 1), (2 * 65536, 2)]
    assert graph.node("top").stats.copy_on_read_bytes == 65536
    # A second read copies nothing more.
    await top.read(100_000, 10)
    assert graph.node("top").stats.copy_on_read_bytes == 65536
    # CACHE prefetches everything; the data is unchanged and now all in the overlay.
    assert top.caps.can_cache
    await top.cache(0, 1 << 20)
    assert [(e.length, e.depth) for e in await top.allocation_depth(0, 1 << 20)] == [(1 << 20, 1)]
    assert bytes(await top.read(0, 1 << 20)) == bytes(range(256)) * 4096
    await graph.close()


async def _copy_on_read_race(delay_ms: int) -> None:
    # base <- dbg (slow reads) <- top (copy-on-read): while the copy-up of a granule
    # waits for base's data, a write of that whole granule arrives (it needs no copy-up of
    # its own, so it could finish at once); the stale copy must not overwrite it.
    graph = await _cor_graph(
        f"driver=blkdebug,node-name=dbg,image=base,inject-delay.0.ms={delay_ms}"
    )
    await graph.add("driver=memory,node-name=top,backing=dbg,copy-on-read=on")
    user = graph.attach("top", perm=RW, user="user")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(user.read, 0, 10)
        await trio.sleep(0)
        nursery.start_soon(user.write, 0, b"\xee" * 65536)
    assert graph.node("top").stats.copy_on_read_bytes == 65536
    # A plain flag, not a comparison pytest would explain: diffing 64 KiB takes minutes.
    kept = bytes(await user.read(0, 65536)) == b"\xee" * 65536
    await graph.close()
    assert kept, "the concurrent write was overwritten by the stale copy-up"


async def test_copy_on_read_never_loses_a_concurrent_write() -> None:
    await _copy_on_read_race(5)


async def test_copy_on_read_needs_a_writable_node() -> None:
    with pytest.raises(GraphError, match="'copy-on-read'"):
        await open_graph(["driver=memory,node-name=m,size=1M,read-only=on,copy-on-read=on"])


async def test_copy_on_read_race_control(monkeypatch: pytest.MonkeyPatch) -> None:
    # The control experiment: without serialisation the test above loses the write.
    from nbdserve.block.tracking import TrackedRequest, Tracker

    async def no_wait(self: Tracker, start: int, end: int, serialising: bool) -> Any:
        req = TrackedRequest(start, end, False)
        self.requests.append(req)
        return req

    monkeypatch.setattr(Tracker, "begin", no_wait)
    with pytest.raises(AssertionError, match="overwritten by the stale copy-up"):
        await _copy_on_read_race(300)  # long enough that the write surely comes first
