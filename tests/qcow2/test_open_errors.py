"""Images we cannot honour are refused at open with a message saying why."""

from __future__ import annotations

import contextlib
import errno
import struct
from pathlib import Path

import pytest

from nbdserve.block import GraphError
from nbdserve.block.qcow2.header import Qcow2FormatError, parse_header, zstd_available

from .helpers import open_image, qemu_img_create, qemu_io, raw_of, run


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def _refused(path: Path, *words: str, writable: bool = False) -> None:
    with pytest.raises(GraphError) as info:
        graph, _ = await open_image(path, writable=writable)
        await graph.close()
    message = str(info.value)
    for word in words:
        assert word in message, message


async def test_not_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "raw.img"
    path.write_bytes(bytes(1 << 20))
    await _refused(path, "not a qcow2 image")


async def test_unknown_incompatible_feature_named(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    _patch(img, 72, struct.pack(">Q", 1 << 40))
    await _refused(img, "unsupported incompatible features", "unknown feature bit 40")


async def test_feature_name_table_used_in_message(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M", "extended_l2=on", "cluster_size=64k")
    await _refused(img, "extended L2")


async def test_encryption_refused(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    _patch(img, 32, struct.pack(">I", 1))
    await _refused(img, "encrypted", "AES")


async def test_external_data_file_refused(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M", f"data_file={tmp_path / 'data.raw'}")
    await _refused(img, "external data file")


async def test_dirty_image_readable_but_not_writable(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    _patch(img, 72, struct.pack(">Q", 1))  # dirty bit
    await _refused(img, "dirty bit", "qemu-img check -r all", writable=True)
    graph, child = await open_image(img)
    try:
        assert bytes(await child.read(0, 4)) == b"\x42" * 4
    finally:
        await graph.close()


async def test_zstd_compression(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"abc" * 100_000)
    img = tmp_path / "z.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, img)
    if not zstd_available():
        await _refused(img, "zstd", "zstandard")
        return
    graph, child = await open_image(img)
    try:
        assert bytes(await child.read(0, child.size)) == raw_of(img, tmp_path)
    finally:
        await graph.close()


async def test_l1_table_past_end_of_file(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    _patch(img, 40, struct.pack(">Q", 1 << 30))
    await _refused(img, "L1 table lies beyond the end")


@pytest.mark.parametrize(
    ("offset", "value", "words"),
    [
        (4, struct.pack(">I", 4), "version 4"),
        (20, struct.pack(">I", 22), "cluster size"),
        (20, struct.pack(">I", 8), "cluster size"),
        (100, struct.pack(">I", 101), "header_length"),
        (96, struct.pack(">I", 7), "refcount_order"),
    ],
)
def test_malformed_headers(offset: int, value: bytes, words: str, tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    data = bytearray(img.read_bytes()[:65536])
    data[offset : offset + len(value)] = value
    with pytest.raises(Qcow2FormatError, match=words):
        parse_header(bytes(data))


def test_garbage_never_crashes() -> None:
    """Any first cluster either parses or raises Qcow2FormatError."""
    import random

    rng = random.Random(3)
    base = bytearray(b"QFI\xfb" + bytes(4092))
    base[4:8] = struct.pack(">I", 3)
    for _ in range(2000):
        buf = bytearray(base)
        for _ in range(rng.randrange(1, 12)):
            buf[rng.randrange(128)] = rng.randrange(256)
        buf[20:24] = struct.pack(">I", rng.choice([9, 12, 16, rng.randrange(64)]))
        with contextlib.suppress(Qcow2FormatError):
            parse_header(bytes(buf))


async def test_corrupt_l2_entry_is_eio(tmp_path: Path) -> None:
    """A mapping that points outside the file fails the request with EIO, not a crash."""
    img = qemu_img_create(tmp_path / "a.qcow2", "1M")
    qemu_io(img, "write -P 0x42 0 64k")
    data = img.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00
    _patch(img, l2_offset, struct.pack(">Q", (1 << 63) | (1 << 40)))
    graph, child = await open_image(img)
    try:
        await child.read(65536, 512)  # the L2 table is cached now: read_nowait must say no
        assert child.read_nowait(0, 4096) is None
        with pytest.raises(OSError) as info:
            await child.read(0, 4096)
        assert info.value.errno == errno.EIO and "past the end" in str(info.value)
        assert bytes(await child.read(65536, 4096)) == bytes(4096)  # the rest still reads
    finally:
        await graph.close()
