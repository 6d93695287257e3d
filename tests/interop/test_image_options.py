"""qemu-nbd's image flags, same meaning on both servers: --image-opts, -s, --cache,
--detect-zeroes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.interop._server import ImageFactory, MiB, ServeFactory
from tests.interop._tools import nbdinfo_json, qemu_io, run


def test_image_opts_raw_window_into_a_file(serve: ServeFactory,
                                           make_image: ImageFactory) -> None:
    content = random.Random(9).randbytes(8 * MiB)
    image = make_image(8 * MiB, {0: content})
    server = serve("--image-opts",
                   f"driver=raw,offset=1M,size=4M,file.driver=file,file.filename={image}")
    assert nbdinfo_json(server)["exports"][0]["export-size"] == 4 * MiB
    qemu_io(server, "write -P 0x66 0 4k", "write -P 0x67 4092k 4k")
    server.stop()
    expected = bytearray(content)
    expected[MiB:MiB + 4096] = b"\x66" * 4096
    expected[5 * MiB - 4096:5 * MiB] = b"\x67" * 4096
    assert image.read_bytes() == expected  # nothing outside the window was touched


def test_snapshot_leaves_the_image_untouched(serve: ServeFactory,
                                             make_image: ImageFactory) -> None:
    image = make_image(4 * MiB, {0: b"\x12" * MiB})
    before = image.read_bytes()
    server = serve("-f", "raw", "-s", str(image))
    qemu_io(server, "write -P 0x34 0 2M", "read -P 0x34 0 2M")
    qemu_io(server, "read -P 0x34 0 2M")  # a second client sees the overlay's data
    server.stop()
    assert image.read_bytes() == before
    leftovers = [p.name for p in image.parent.iterdir() if p.suffix == ".qcow2"]
    assert not leftovers, f"temporary overlay left behind: {leftovers}"


@pytest.mark.parametrize("cache", ["none", "writethrough", "unsafe"])
def test_cache_modes_serve_the_same_data(serve: ServeFactory, image: Path,
                                         cache: str) -> None:
    server = serve("-f", "raw", f"--cache={cache}", str(image))
    qemu_io(server, "write -P 0x71 0 1M", "write -P 0x72 4097 8191", "flush",
            "read -P 0x71 0 4097", "read -P 0x72 4097 8191")
    server.stop()
    data = image.read_bytes()
    assert data[:4097] == b"\x71" * 4097 and data[4097:12288] == b"\x72" * 8191


def test_detect_zeroes_unmap_turns_zero_writes_into_holes(
    serve: ServeFactory, make_image: ImageFactory
) -> None:
    image = make_image(8 * MiB, {0: b"\x01" * (4 * MiB)})
    os.sync()
    blocks_before = os.stat(image).st_blocks
    server = serve("-f", "raw", "--discard=unmap", "--detect-zeroes=unmap", str(image))
    qemu_io(server, "write -P 0 1M 2M", "read -P 0 1M 2M", "read -P 1 0 1M")
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()],
              server=server).stdout
    at_2m = next(e for e in json.loads(out) if e["start"] <= 2 * MiB < e["start"] + e["length"])
    assert at_2m["zero"] is True, out
    server.stop()
    assert os.stat(image).st_blocks < blocks_before, "the zero write allocated or kept space"
