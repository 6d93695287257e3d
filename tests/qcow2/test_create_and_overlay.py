"""create_qcow2 makes images qemu accepts; snapshot overlays never touch the original."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nbdserve.block import Perm, ReqFlags, open_graph
from nbdserve.block.qcow2 import add_snapshot_overlay, create_qcow2

from .helpers import RW, check_image, open_image, qemu_img_create, qemu_io, raw_of, run

MiB = 1 << 20


@pytest.mark.parametrize(
    ("size", "cs", "compat"),
    [(1 << 30, 65536, "1.1"), (100 * MiB, 512, "1.1"), (10 * MiB, 2 * MiB, "0.10"),
     (12345, 4096, "1.1"), (0, 65536, "1.1"), (1 << 40, 65536, "1.1")],
)
async def test_create_accepted_by_qemu(tmp_path: Path, size: int, cs: int, compat: str) -> None:
    img = tmp_path / "new.qcow2"
    await create_qcow2(img, size, cluster_size=cs, compat=compat)
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["virtual-size"] == -(-size // 512) * 512
    assert info["cluster-size"] == cs
    assert info["format-specific"]["data"]["compat"] == compat
    check = check_image(img)
    assert check["returncode"] == 0, check
    if size:  # and qemu can write to it
        qemu_io(img, "write -P 0x5 0 512")
        assert check_image(img)["returncode"] == 0


async def test_create_with_backing(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x77 0 4M")
    img = tmp_path / "sub" / "top.qcow2"
    img.parent.mkdir()
    await create_qcow2(img, 6 * MiB, backing_file="../base.qcow2", backing_fmt="qcow2")
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["backing-filename"] == "../base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    graph, child = await open_image(img, writable=True)
    try:
        assert len(graph.nodes) == 4  # top, its file, base, its file
        await child.write(4 * MiB - 100, b"\x01" * 200)  # straddles the backing's end
        assert bytes(await child.read(0, 4)) == b"\x77" * 4
        tail = bytes(await child.read(4 * MiB - 200, 400))
        assert tail == b"\x77" * 100 + b"\x01" * 200 + bytes(100)
    finally:
        await graph.close()
    assert raw_of(img, tmp_path)[4 * MiB - 200 : 4 * MiB + 200] == tail
    assert check_image(img)["returncode"] == 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"cluster_size": 1000}, "power of two"),
        ({"cluster_size": 4 * MiB}, "power of two"),
        ({"compat": "2.0"}, "compat"),
        ({"backing_fmt": "raw"}, "without backing_file"),
        ({"backing_file": "x" * 2000}, "longer than"),
    ],
)
async def test_create_rejects_bad_parameters(tmp_path: Path, kwargs: dict[str, object],
                                             words: str) -> None:
    with pytest.raises(ValueError, match=words):
        await create_qcow2(tmp_path / "bad.qcow2", MiB, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too large"):
        await create_qcow2(tmp_path / "big.qcow2", 1 << 50, cluster_size=512)


async def test_snapshot_overlay_leaves_original_untouched(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x42" * (3 * MiB + 512))
    before = disk.read_bytes()
    graph = await open_graph(
        [{"driver": "raw", "node-name": "disk", "read-only": True,
          "file": {"driver": "file", "filename": str(disk)}}]
    )
    try:
        overlay = await add_snapshot_overlay(graph, "disk", tmpdir=str(tmp_path))
        assert overlay.name == "snapshot"
        assert os.listdir(tmp_path) == ["disk.raw"]  # the overlay file is already unlinked
        child = graph.attach(overlay.name, perm=RW & ~Perm.RESIZE, user="export")
        assert child.size == 3 * MiB + 512
        await child.write(1000, b"\x00" * 70000)
        await child.zero(2 * MiB, MiB, ReqFlags.MAY_UNMAP)
        await child.flush()
        data = bytes(await child.read(0, child.size))
        assert data[:1000] == b"\x42" * 1000 and data[1000:71000] == bytes(70000)
        assert data[71000 : 2 * MiB] == b"\x42" * (2 * MiB - 71000)
        assert data[2 * MiB : 3 * MiB] == bytes(MiB) and data[3 * MiB :] == b"\x42" * 512
        depths = await child.allocation_depth(0, child.size)
        assert {e.depth for e in depths} == {1, 2}
    finally:
        await graph.close()
    assert disk.read_bytes() == before
    assert os.listdir(tmp_path) == ["disk.raw"]
