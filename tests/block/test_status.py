"""Block status: the block.h truth table and the backing-chain walk, on a three-layer chain
of memory nodes (base 1 MiB <- mid 2 MiB <- top 4 MiB), plus OFFSET_VALID mappings through
raw, and merging."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nbdserve.block import Child, Extent, Graph, Perm, Status, open_graph

K64 = 65536
M = 1 << 20
D, Z, OV, A, E = Status.DATA, Status.ZERO, Status.OFFSET_VALID, Status.ALLOCATED, Status.EOF


@pytest.fixture
async def chain() -> AsyncIterator[tuple[Graph, Child]]:
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "base", "size": M},
            {"driver": "memory", "node-name": "mid", "size": 2 * M, "backing": "base"},
            {"driver": "memory", "node-name": "top", "size": 4 * M, "backing": "mid"},
        ]
    )
    rw = Perm.CONSISTENT_READ | Perm.WRITE
    for name, writes, zeros in [
        # base: data in [0, 64K) and [256K, 320K)
        ("base", [(0, b"b" * K64), (4 * K64, b"B" * K64)], []),
        # mid: data in [64K, 128K); zeros hiding base's data in [256K, 320K)
        ("mid", [(K64, b"m" * K64)], [(4 * K64, K64)]),
        # top: data in [128K, 192K); zeros in [192K, 256K); data past mid's end at 3M
        ("top", [(2 * K64, b"t" * K64), (3 * M, b"T" * K64)], [(3 * K64, K64)]),
    ]:
        user = graph.attach(name, perm=rw, user=f"setup {name}")
        for offset, data in writes:
            await user.write(offset, data)
        for offset, length in zeros:
            await user.zero(offset, length)
        user.detach()
    top = graph.attach("top", perm=Perm.CONSISTENT_READ)
    yield graph, top
    await graph.close()


def _table(extents: list[Extent]) -> list[tuple[int, Status]]:
    return [(e.length, e.status) for e in extents]


async def test_reads_through_the_chain(chain: tuple[Graph, Child]) -> None:
    _, top = chain
    got = bytes(await top.read(0, 4 * M))
    expected = bytearray(4 * M)
    expected[0:K64] = b"b" * K64
    expected[K64 : 2 * K64] = b"m" * K64
    expected[2 * K64 : 3 * K64] = b"t" * K64
    expected[3 * M : 3 * M + K64] = b"T" * K64
    assert got == expected


async def test_block_status_above_the_chain(chain: tuple[Graph, Child]) -> None:
    _, top = chain
    # Adjacent extents with equal flags merge, whichever layer they come from (the
    # depths are in test_allocation_depth).
    assert _table(await top.block_status(0, 4 * M)) == [
        (3 * K64, D | A),  # data from base, mid and top
        (2 * K64, Z | A),  # zeroed in top; zeroed in mid, hiding base's data
        (M - 5 * K64, Z),  # unallocated everywhere, base has no backing: zeros
        # past base's end (mid is longer), then past mid's end (top is longer): zeros,
        # allocated at the short layer
        (2 * M, Z | A),
        (K64, D | A),
        (M - K64, Z | A | E),
    ]


async def test_allocation_depth(chain: tuple[Graph, Child]) -> None:
    _, top = chain
    assert [(e.length, e.depth) for e in await top.allocation_depth(0, 4 * M)] == [
        (K64, 3),
        (K64, 2),
        (2 * K64, 1),
        (K64, 2),
        (M - 5 * K64, 0),
        (M, 3),
        (M, 2),
        (K64, 1),
        (M - K64, 2),
    ]
    depths = await top.allocation_depth(0, 4 * M)
    assert all(bool(e.status & A) == (e.depth > 0) for e in depths)
    assert depths[-1].status & E


async def test_status_of_a_lower_layer_alone(chain: tuple[Graph, Child]) -> None:
    graph, _ = chain
    mid = graph.attach("mid", perm=Perm.CONSISTENT_READ)
    assert _table(await mid.block_status(0, 2 * M)) == [
        (2 * K64, D | A),
        (2 * K64, Z),
        (K64, Z | A),
        (M - 5 * K64, Z),
        (M, Z | A | E),
    ]


async def test_partial_queries_are_clamped(chain: tuple[Graph, Child]) -> None:
    _, top = chain
    assert _table(await top.block_status(100, 1000)) == [(1000, D | A)]
    assert _table(await top.block_status(4 * M - 10, 10)) == [(10, Z | A | E)]
    assert [e.length for e in await top.block_status(K64 - 1, 2)] == [2]


async def test_offset_valid_mapping_through_raw() -> None:
    graph = await open_graph(
        [
            {"driver": "null", "node-name": "n", "size": 4 * M},
            {"driver": "raw", "node-name": "r", "file": "n", "offset": M, "size": 2 * M},
        ]
    )
    child = graph.attach("r")
    [ext] = await child.block_status(100, 1000)
    assert ext.status == Z | OV | A
    assert ext.map_offset == M + 100 and ext.file is graph.node("n")
    [ext] = await child.block_status(0, 2 * M)
    assert ext.status == Z | OV | A | E and ext.length == 2 * M
    await graph.close()


async def test_null_without_read_zeroes_is_neither_data_nor_zero() -> None:
    graph = await open_graph(["driver=null,node-name=n,size=1M,read-zeroes=off"])
    [ext] = await graph.attach("n").block_status(0, M)
    assert ext.status == OV | E  # not DATA, not ZERO, not ALLOCATED: promises nothing
    await graph.close()


async def test_filter_is_transparent_to_status() -> None:
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "base", "size": M},
            {"driver": "memory", "node-name": "top", "backing": "base"},
            {"driver": "blkdebug", "node-name": "dbg", "image": "top"},
        ]
    )
    base = graph.attach("base", perm=Perm.CONSISTENT_READ | Perm.WRITE, user="w")
    await base.write(0, b"x" * K64)
    base.detach()
    child = graph.attach("dbg")
    assert _table(await child.block_status(0, M)) == [(K64, D | A), (M - K64, Z | E)]
    depths = await child.allocation_depth(0, M)
    assert [(e.length, e.depth) for e in depths] == [(K64, 2), (M - K64, 0)]
    await graph.close()


async def test_max_extents_limits_the_answer(chain: tuple[Graph, Child]) -> None:
    _, top = chain
    extents = await top.block_status(0, 4 * M, max_extents=2)
    assert len(extents) == 2 and sum(e.length for e in extents) == 5 * K64
