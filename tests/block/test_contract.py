"""One contract every driver configuration in ``configs.CONFIGS`` must keep, seen through a
user's edge: sizes, bounds, permissions, reads and writes at any alignment, zeroing,
discard, flush, block status, capabilities and statistics."""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdserve.block import Child, Graph, Perm, ReqFlags, Status

from .configs import CONFIGS, SIZE, Config, open_config

RW = Perm.CONSISTENT_READ | Perm.WRITE


@pytest.fixture(params=CONFIGS, ids=[c.name for c in CONFIGS])
def config(request: pytest.FixtureRequest) -> Config:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def graph(config: Config, tmp_path: Path) -> AsyncIterator[Graph]:
    graph = await open_config(config, tmp_path)
    try:
        yield graph
    finally:
        await graph.close()


@pytest.fixture
def rw(graph: Graph) -> Child:
    return graph.attach("top", perm=RW, user="test writer")


async def test_size_and_limits(rw: Child) -> None:
    assert rw.size == SIZE
    lim = rw.limits
    assert lim.request_alignment >= 1 and lim.request_alignment & (lim.request_alignment - 1) == 0


async def test_out_of_range_is_einval(rw: Child) -> None:
    for offset, length in [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, SIZE + 1)]:
        with pytest.raises(OSError) as info:
            await rw.read(offset, length)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            await rw.write(offset, b"x" * max(length, 0))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            await rw.zero(offset, length)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        await rw.block_status(SIZE, 1)
    assert info.value.errno == errno.EINVAL


async def test_zero_length_requests_are_noops(rw: Child) -> None:
    assert bytes(await rw.read(10, 0)) == b""
    await rw.write(10, b"")
    await rw.zero(10, 0)
    await rw.discard(10, 0)


async def test_reader_cannot_write(graph: Graph) -> None:
    ro = graph.attach("top", perm=Perm.CONSISTENT_READ, user="reader")
    assert ro.caps.read_only
    for call in (ro.write(0, b"x"), ro.zero(0, 1), ro.discard(0, 1)):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EPERM
    assert ro.write_nowait(0, b"x" * 4096) is False


async def test_unaligned_write_read_roundtrip(config: Config, rw: Child) -> None:
    pieces = [(0, b"a" * 4096), (4097, b"hello"), (65530, b"x" * 20), (SIZE - 3, b"end")]
    for offset, data in pieces:
        await rw.write(offset, data)
    for offset, data in pieces:
        got = bytes(await rw.read(offset, len(data)))
        assert got == (data if config.stores else bytes(len(data)))
    # Neighbours of an unaligned write are untouched.
    assert bytes(await rw.read(4096, 1)) == b"\0"
    assert bytes(await rw.read(4102, 1)) == b"\0"


async def test_large_write_read(config: Config, rw: Child) -> None:
    data = bytes(range(256)) * (3 * 4096 + 7)
    await rw.write(1000, data, ReqFlags.FUA)
    got = bytes(await rw.read(1000, len(data)))
    assert got == (data if config.stores else bytes(len(data)))


async def test_nowait_paths_agree_with_async(config: Config, rw: Child) -> None:
    data = b"\x5a" * 4096
    if not rw.write_nowait(8192, data):
        await rw.write(8192, data)
    got = rw.read_nowait(8192, 4096)
    if got is None:
        got = await rw.read(8192, 4096)
    assert bytes(got) == (data if config.stores else bytes(4096))


async def test_zero(config: Config, rw: Child) -> None:
    await rw.write(0, b"\xff" * 200_000)
    await rw.zero(1, 199_998, ReqFlags.MAY_UNMAP)
    got = bytes(await rw.read(0, 200_000))
    if config.stores:
        assert got == b"\xff" + bytes(199_998) + b"\xff"
    else:
        assert got == bytes(200_000)


async def test_fast_zero_refused_or_done(rw: Child) -> None:
    align = rw.limits.request_alignment
    if rw.caps.can_fast_zero:
        await rw.zero(0, 64 * 1024, ReqFlags.NO_FALLBACK)
        assert bytes(await rw.read(0, 64 * 1024)) == bytes(64 * 1024)
    else:
        with pytest.raises(OSError) as info:
            await rw.zero(0, 64 * 1024, ReqFlags.NO_FALLBACK)
        assert info.value.errno == errno.ENOTSUP
    if align > 1:
        with pytest.raises(OSError) as info:
            await rw.zero(1, align, ReqFlags.NO_FALLBACK)
        assert info.value.errno == errno.ENOTSUP


async def test_discard_then_flush(rw: Child) -> None:
    await rw.write(0, b"\x01" * 131072)
    await rw.discard(0, 131072, ReqFlags.FUA)
    await rw.flush()
    got = bytes(await rw.read(0, 131072))
    # Discard is advisory: each byte reads either as before or as zero.
    assert set(got) <= {0, 1}


async def test_cache_is_harmless(config: Config, rw: Child) -> None:
    await rw.write(0, b"q" * 10)
    await rw.cache(0, SIZE)
    assert bytes(await rw.read(0, 10)) == (b"q" * 10 if config.stores else bytes(10))


async def test_block_status_covers_the_range(config: Config, rw: Child) -> None:
    await rw.write(65536 * 3, b"d" * 65536)
    await rw.zero(65536 * 5, 65536)
    for offset, length in [(0, SIZE), (1, 1000), (65536 * 3 + 5, 65536), (SIZE - 10, 10)]:
        extents = await rw.block_status(offset, length)
        assert extents and all(e.length > 0 for e in extents)
        assert sum(e.length for e in extents) == length
        assert bool(extents[-1].status & Status.EOF) == (offset + length == SIZE)
        assert not any(e.status & Status.EOF for e in extents[:-1])
        for a, b in itertools.pairwise(extents):
            assert (a.status | Status.EOF) != (b.status | Status.EOF) or (
                a.status & Status.OFFSET_VALID
            )
        depths = await rw.allocation_depth(offset, length)
        assert sum(e.length for e in depths) == length
    if config.stores:
        # Written data is never reported as reading as zeros.
        for ext in await rw.block_status(65536 * 3, 65536):
            assert not ext.status & Status.ZERO
        # Ranges reported as ZERO really read as zeros.
        pos = 0
        for ext in await rw.block_status(0, SIZE):
            if ext.status & Status.ZERO:
                assert bytes(await rw.read(pos, ext.length)) == bytes(ext.length)
            pos += ext.length


async def test_caps_are_honest(rw: Child) -> None:
    caps = rw.caps
    assert not caps.read_only and caps.can_zero and caps.multi_conn_safe
    if caps.can_flush:
        await rw.flush()
    if caps.native_fua:
        await rw.write(0, b"f", ReqFlags.FUA)


async def test_statistics_count_requests(graph: Graph, rw: Child) -> None:
    stats = graph.node("top").stats
    before = stats.as_dict()
    await rw.write(0, b"s" * 4096)
    await rw.read(0, 4096)
    await rw.read(1, 10)
    with pytest.raises(OSError):
        await rw.read(SIZE, 1)
    after = stats.as_dict()
    assert after["write_ops"] == before["write_ops"] + 1  # type: ignore[operator]
    assert after["write_bytes"] == before["write_bytes"] + 4096  # type: ignore[operator]
    assert after["read_ops"] == before["read_ops"] + 2  # type: ignore[operator]
    assert after["read_bytes"] == before["read_bytes"] + 4106  # type: ignore[operator]
    assert stats.errors.get("EINVAL", 0) >= 1
