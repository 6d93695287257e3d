"""The ``file`` driver inside a graph: options, the generic request path on top of it, image
locking through attach/detach, and O_DIRECT with the generic layer's padding."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdserve.block import GraphError, Perm, ReqFlags, Status, open_graph, parse_dotted

MiB = 1 << 20
READ = Perm.CONSISTENT_READ
RW = READ | Perm.WRITE
#: What an export shares with other users of its node inside this process.
SHARE = READ | Perm.WRITE | Perm.WRITE_UNCHANGED


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x42" * 65536)
    return path


async def test_requests_through_a_child(img: Path) -> None:
    graph = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)}])
    try:
        child = graph.attach("f", perm=RW, shared=SHARE, user="test")
        caps = child.caps
        assert caps.native_fua and caps.can_zero and caps.can_fast_zero and caps.can_flush
        assert caps.has_block_status and caps.can_cache and not caps.read_only
        buf = child.read_nowait(100, 1000)  # page cache: answered without awaiting
        assert buf is not None and bytes(buf) == b"\x42" * 1000
        await child.write(65536 - 10, b"\x07" * 20, ReqFlags.FUA)
        await child.zero(8192, 4096, ReqFlags.NO_FALLBACK)  # fast zero: fallocate
        await child.flush()
        data = img.read_bytes()
        assert data[65536 - 10 : 65536 + 10] == b"\x07" * 20
        assert data[8192:12288] == bytes(4096)
        extents = await child.block_status(0, 4 * MiB)
        assert sum(e.length for e in extents) == 4 * MiB
        assert extents[0].status & Status.DATA and extents[0].file is graph.node("f")
        assert extents[-1].status & Status.ZERO and extents[-1].status & Status.EOF
    finally:
        await graph.close()


async def test_dotted_options_and_bad_values(img: Path) -> None:
    graph = await open_graph(
        [parse_dotted(f"driver=file,node-name=f,filename={img},aio=native,locking=off")]
    )
    try:
        drv = graph.node("f").driver
        assert drv.aio_engine == "threads"  # type: ignore[attr-defined]
        assert drv.lock is None  # type: ignore[attr-defined]
    finally:
        await graph.close()
    with pytest.raises(GraphError, match="node 'f', option 'aio'"):
        await open_graph([parse_dotted(f"driver=file,node-name=f,filename={img},aio=posix")])
    with pytest.raises(GraphError, match="node 'f', option 'locking'"):
        await open_graph([{"driver": "file", "node-name": "f", "filename": str(img),
                           "locking": "maybe"}])
    with pytest.raises(GraphError, match="node 'f', option 'filename'"):
        await open_graph([{"driver": "file", "node-name": "f"}])
    missing = img.parent / "missing.img"
    with pytest.raises(GraphError) as info:
        await open_graph([{"driver": "file", "node-name": "f", "filename": str(missing)}])
    assert "node 'f', option 'filename'" in str(info.value) and str(missing) in str(info.value)


async def test_read_only_node(img: Path) -> None:
    graph = await open_graph(
        [{"driver": "file", "node-name": "f", "filename": str(img), "read-only": True}]
    )
    try:
        with pytest.raises(GraphError):
            graph.attach("f", perm=RW, user="writer")
        child = graph.attach("f", perm=READ, user="reader")
        assert child.caps.read_only and not child.caps.can_discard
        assert bytes(await child.read(0, 4)) == b"\x42" * 4
    finally:
        await graph.close()


async def test_two_graphs_cannot_both_write_one_image(img: Path) -> None:
    first = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)}])
    second = await open_graph(
        [{"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(img)}}]
    )
    try:
        writer = first.attach("f", perm=RW, shared=SHARE, user="export 'a'")
        with pytest.raises(GraphError) as info:
            second.attach("r", perm=RW, shared=SHARE, user="export 'b'")
        assert "lock" in str(info.value) and str(img) in str(info.value)
        reader = second.attach("r", perm=READ, shared=Perm.ALL, user="a tolerant reader")
        reader.detach()
        writer.detach()  # the last user gone: the locks go with it
        second.attach("r", perm=RW, shared=SHARE, user="export 'b'")
        with pytest.raises(GraphError, match='Failed to get "write" lock'):
            first.attach("f", perm=RW, shared=SHARE, user="export 'a'")
    finally:
        await first.close()
        await second.close()


async def test_closing_a_graph_releases_its_locks(img: Path) -> None:
    first = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)}])
    first.attach("f", perm=RW, shared=SHARE)
    await first.close()
    second = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)}])
    try:
        second.attach("f", perm=RW, shared=SHARE)
    finally:
        await second.close()


async def test_locking_off_lets_two_writers_in(img: Path) -> None:
    opts = {"driver": "file", "node-name": "f", "filename": str(img), "locking": "off"}
    first, second = await open_graph([opts]), await open_graph([opts])
    try:
        first.attach("f", perm=RW, shared=SHARE)
        second.attach("f", perm=RW, shared=SHARE)
    finally:
        await first.close()
        await second.close()


# -- O_DIRECT through the generic layer ------------------------------------------------------
async def test_direct_unaligned_requests_are_padded(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(os.urandom(1_000_000))  # not a multiple of any block size
    model = bytearray(path.read_bytes())
    graph = await open_graph(
        [{"driver": "file", "node-name": "f", "filename": str(path), "cache.direct": True}]
    )
    try:
        child = graph.attach("f", perm=RW | Perm.RESIZE, shared=SHARE)
        drv = graph.node("f").driver
        assert drv.direct and child.limits.request_alignment >= 512  # type: ignore[attr-defined]
        assert child.read_nowait(0, 4096) is None  # never served from the event loop
        for offset, length in [(1, 1), (511, 1025), (4095, 9000), (1_000_000 - 700, 700)]:
            data = os.urandom(length)
            await child.write(offset, data)
            model[offset : offset + length] = data
            assert bytes(await child.read(offset, length)) == bytes(model[offset : offset + length])
        await child.zero(1_000_000 - 3000, 3000, ReqFlags.MAY_UNMAP)
        model[-3000:] = bytes(3000)
        await child.flush()
    finally:
        await graph.close()
    assert os.path.getsize(path) == 1_000_000  # padding never grew the file
    assert path.read_bytes() == bytes(model)


async def test_direct_and_buffered_users_see_the_same_bytes(img: Path) -> None:
    graph = await open_graph(
        [
            {"driver": "file", "node-name": "d", "filename": str(img), "cache.direct": True,
             "locking": "off"},
            {"driver": "file", "node-name": "b", "filename": str(img), "locking": "off"},
        ]
    )
    try:
        direct = graph.attach("d", perm=RW, shared=SHARE)
        buffered = graph.attach("b", perm=RW, shared=SHARE)
        await buffered.write(MiB, b"\x99" * 8192)
        await buffered.flush()
        assert bytes(await direct.read(MiB, 8192)) == b"\x99" * 8192
        await direct.write(2 * MiB, b"\x55" * 4096)
        assert bytes(await buffered.read(2 * MiB, 4096)) == b"\x55" * 4096
    finally:
        await graph.close()


async def test_errors_reach_the_user_as_oserror(img: Path) -> None:
    graph = await open_graph([{"driver": "file", "node-name": "f", "filename": str(img)}])
    try:
        child = graph.attach("f", perm=RW, shared=SHARE)
        fd = graph.node("f").driver.fd  # type: ignore[attr-defined]
        os.close(fd)  # yank the descriptor: every request now fails with EBADF
        with pytest.raises(OSError) as info:
            await child.read(0, 4096)
        assert info.value.errno == errno.EBADF
        assert graph.node("f").stats.errors.get("EBADF", 0) >= 1
        graph.node("f").driver.fd = -1  # type: ignore[attr-defined]
    finally:
        await graph.close()


async def test_cache_modes(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu's cache modes are cache.direct x cache.no-flush: unsafe skips fdatasync."""
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    for no_flush, direct, expect_sync in [(False, False, True), (True, False, False),
                                          (False, True, True), (True, True, False)]:
        graph = await open_graph(
            [{"driver": "file", "node-name": "f", "filename": str(img),
              "cache": {"direct": direct, "no-flush": no_flush}}]
        )
        try:
            child = graph.attach("f", perm=RW, shared=SHARE)
            assert graph.node("f").driver.direct is direct  # type: ignore[attr-defined]
            await child.write(0, b"\x01" * 4096)
            synced.clear()
            await child.flush()
            assert bool(synced) is expect_sync, (no_flush, direct)
        finally:
            await graph.close()
