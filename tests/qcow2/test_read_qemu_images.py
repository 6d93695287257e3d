"""Images made by qemu-img/qemu-io read byte-identical to ``qemu-img convert -O raw`` and map
exactly like ``qemu-img map``: cluster sizes, compat levels, chains, compressed and zero
clusters."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdserve.block import Status

from .helpers import (
    assert_same_map,
    open_image,
    our_map,
    qemu_img_create,
    qemu_io,
    qemu_map,
    raw_of,
    run,
    their_map,
)

MiB = 1 << 20


def _pattern(path: Path, cs: int, size: int) -> None:
    """Data, zero clusters (allocated and not), a discard and unaligned writes."""
    qemu_io(
        path,
        f"write -P 0x11 0 {3 * cs}",
        f"write -P 0x22 {cs // 2 + 7} 1000",
        f"write -P 0x33 {size // 2} {2 * cs + 512}",
        f"write -z {cs} {cs}",
        f"write -z -u {size // 2 + cs} {cs}",
        f"write -P 0x44 {size - 4096} 4096",
        f"discard {size // 2} {cs}",
    )


def _plain(cs: int, compat: str, size: int = 8 * MiB) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        img = qemu_img_create(tmp / "img.qcow2", size, f"cluster_size={cs}", f"compat={compat}")
        _pattern(img, cs, size)
        return img

    return make


def _chain3(tmp: Path) -> Path:
    # raw base (shorter), qcow2 middle (4K clusters), qcow2 top (64K clusters, larger)
    base = tmp / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", base, str(6 * MiB))
    qemu_io(base, "write -P 0xaa 0 6M", fmt="raw")
    mid = qemu_img_create(tmp / "mid.qcow2", 8 * MiB, "cluster_size=4096", backing=base,
                          backing_fmt="raw")
    qemu_io(mid, "write -P 0xbb 1M 1M", "write -z 3M 64k", "write -P 0xcc 7M 100k")
    top = qemu_img_create(tmp / "top.qcow2", 10 * MiB, backing=mid)
    qemu_io(top, "write -P 0xdd 1536k 100k", "write -z 5M 128k", "write -P 0xee 9M 4k")
    return top


def _compressed(tmp: Path) -> Path:
    rng = random.Random(7)
    src = tmp / "src.raw"
    data = bytearray(4 * MiB)
    for i in range(0, len(data), 65536):
        kind = rng.randrange(3)
        if kind == 0:
            data[i : i + 65536] = rng.randbytes(65536)  # incompressible: stored as is
        elif kind == 1:
            data[i : i + 65536] = bytes([i // 65536 % 256]) * 65536
        # kind 2: zeros -> unallocated
    data[100_000:100_100] = b"x" * 100
    src.write_bytes(bytes(data))
    img = tmp / "comp.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, img)
    # a partial overwrite turns one compressed cluster into a normal one
    qemu_io(img, "write -P 0x5a 70000 3000")
    return img


def _compressed_small_clusters(tmp: Path) -> Path:
    src = tmp / "src.raw"
    src.write_bytes(b"".join(bytes([i % 7]) * 1000 + bytes(24) for i in range(2048)))
    img = tmp / "comp4k.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        src, img)
    return img


def _odd_size(tmp: Path) -> Path:
    img = qemu_img_create(tmp / "odd.qcow2", 5 * MiB + 12345, "cluster_size=65536")
    qemu_io(img, "write -P 0x66 5M 12345", "write -P 0x67 0 1")
    return img


IMAGES: dict[str, Callable[[Path], Path]] = {
    "512-v3": _plain(512, "1.1", 2 * MiB),
    "4k-v3": _plain(4096, "1.1"),
    "64k-v3": _plain(65536, "1.1"),
    "2M-v3": _plain(2 * MiB, "1.1", 16 * MiB),
    "4k-v2": _plain(4096, "0.10"),
    "64k-v2": _plain(65536, "0.10"),
    "chain3": _chain3,
    "compressed": _compressed,
    "compressed-4k": _compressed_small_clusters,
    "odd-size": _odd_size,
}


@pytest.mark.parametrize("name", list(IMAGES))
async def test_reads_like_qemu(tmp_path: Path, name: str) -> None:
    img = IMAGES[name](tmp_path)
    ref = raw_of(img, tmp_path)
    graph, child = await open_image(img)
    try:
        assert child.size == len(ref)
        assert bytes(await child.read(0, child.size)) == ref
        rng = random.Random(name)
        for _ in range(200):
            off = rng.randrange(len(ref))
            n = rng.randrange(1, min(len(ref) - off, 300_000) + 1)
            assert bytes(await child.read(off, n)) == ref[off : off + n], (off, n)
            fast = child.read_nowait(off, n)
            if fast is not None:
                assert bytes(fast) == ref[off : off + n], (off, n)
        assert_same_map(await our_map(child), their_map(img))
    finally:
        await graph.close()


async def test_allocation_depth_matches_qemu_map(tmp_path: Path) -> None:
    img = _chain3(tmp_path)
    graph, child = await open_image(img)
    try:
        depths = []
        pos = 0
        for ext in await child.allocation_depth(0, child.size):
            depths.append((pos, ext.length, ext.depth))
            pos += ext.length
        assert [n.driver_name for n in graph.nodes.values()].count("qcow2") == 2
        for e in qemu_map(img):
            if not e["present"]:
                continue
            for probe in (e["start"], e["start"] + e["length"] - 1):
                got = next(d for s, n, d in depths if s <= probe < s + n)
                assert got == e["depth"] + 1, (probe, e)
    finally:
        await graph.close()


async def test_compressed_clusters_report_data_without_offset(tmp_path: Path) -> None:
    img = _compressed(tmp_path)
    graph, child = await open_image(img)
    try:
        statuses = {e.status & (Status.DATA | Status.OFFSET_VALID)
                    for e in await child.block_status(0, child.size)}
        assert Status.DATA in statuses  # compressed: data, location unknown
        assert Status.DATA | Status.OFFSET_VALID in statuses  # the rewritten cluster
    finally:
        await graph.close()


async def test_backing_option_overrides_header(tmp_path: Path) -> None:
    """``backing: null`` ignores the header's backing file (reads zeros); ``backing`` naming
    another node uses that node instead."""
    img = _chain3(tmp_path)
    graph, child = await open_image(img, extra={"backing": None})
    try:
        assert len(graph.nodes) == 2  # the qcow2 node and its file
        data = await child.read(0, 1 * MiB)
        assert bytes(data) == bytes(1 * MiB)  # no backing: unallocated reads as zeros
        assert bytes(await child.read(9 * MiB, 4096)) == b"\xee" * 4096
    finally:
        await graph.close()
