"""qemu-io against the server: pattern I/O, zero writes, discard, FUA, unaligned requests.

After the server is stopped (SIGTERM flushes), the image file itself is compared with what
the requests should have produced, so a server that answers correctly but stores wrongly
fails too.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.interop._server import ImageFactory, MiB, RunningServer, ServeFactory, Transport
from tests.interop._tools import qemu_io

KiB = 1 << 10


def fill(model: bytearray, offset: int, length: int, byte: int) -> None:
    model[offset:offset + length] = bytes([byte]) * length


def assert_image(path: Path, model: bytearray) -> None:
    data = path.read_bytes()
    assert len(data) == len(model)
    if data != model:
        first = next(i for i, (a, b) in enumerate(zip(data, model, strict=True)) if a != b)
        raise AssertionError(
            f"image differs from model first at offset {first}: "
            f"{data[first]:#x} != {model[first]:#x}"
        )


def test_pattern_write_then_read(serve: ServeFactory, image: Path, transport: Transport) -> None:
    server = serve("-f", "raw", str(image), transport=transport)
    qemu_io(server, "write -P 0xab 0 1M", "read -P 0xab 0 1M", "read -P 0 1M 1M",
            "aio_write -P 0x02 5M 64k", "aio_flush", "read -P 0x02 5M 64k")
    server.stop()
    model = bytearray(16 * MiB)
    fill(model, 0, MiB, 0xAB)
    fill(model, 5 * MiB, 64 * KiB, 0x02)
    assert_image(image, model)


def test_pattern_mismatch_is_reported(server: RunningServer) -> None:
    # Guards the checks above: qemu-io must really fail when the data is not what we claim.
    output = qemu_io(server, "write -P 0x01 0 4k", "read -P 0x02 0 4k", expect_rc=1)
    assert "Pattern verification failed" in output


def test_write_zeroes_with_and_without_unmap(server: RunningServer, image: Path) -> None:
    qemu_io(server, "write -P 0xcd 0 1M",
            "write -z 64k 64k",        # NBD_CMD_WRITE_ZEROES with NO_HOLE
            "write -z -u 192k 128k",   # without NO_HOLE: the server may punch a hole
            "read -P 0xcd 0 64k", "read -P 0 64k 64k", "read -P 0xcd 128k 64k",
            "read -P 0 192k 128k", "read -P 0xcd 320k 704k")
    server.stop()
    model = bytearray(16 * MiB)
    fill(model, 0, MiB, 0xCD)
    fill(model, 64 * KiB, 64 * KiB, 0)
    fill(model, 192 * KiB, 128 * KiB, 0)
    assert_image(image, model)


def test_discard_keeps_neighbours(server: RunningServer, image: Path) -> None:
    # With the default --discard=ignore the discarded range's contents are unspecified by
    # NBD; only the data around it is checked.
    qemu_io(server, "write -P 0x5c 0 3M", "discard 1M 1M", "read -P 0x5c 0 1M",
            "read -P 0x5c 2M 1M")


def test_discard_unmap_punches_a_hole(serve: ServeFactory, make_image: ImageFactory) -> None:
    image = make_image(8 * MiB, {0: b"\x77" * (4 * MiB)})
    os.sync()
    blocks_before = os.stat(image).st_blocks
    server = serve("-f", "raw", "--discard=unmap", str(image))
    qemu_io(server, "discard 1M 2M", "read -P 0 1M 2M", "read -P 0x77 0 1M",
            "read -P 0x77 3M 1M")
    server.stop()
    assert os.stat(image).st_blocks < blocks_before, "no blocks were deallocated"
    model = bytearray(8 * MiB)
    fill(model, 0, 4 * MiB, 0x77)
    fill(model, MiB, 2 * MiB, 0)
    assert_image(image, model)


def test_fua_write_reaches_the_file_before_the_reply(server: RunningServer, image: Path) -> None:
    qemu_io(server, "write -f -P 0x11 4M 4k", "write -z -f 4100k 4k")
    # The server is still running: a FUA write must already be in the file, not in a
    # server-side cache.
    with open(image, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4 * KiB) == b"\x11" * (4 * KiB)
        f.seek(4100 * KiB)
        assert f.read(4 * KiB) == bytes(4 * KiB)


def test_unaligned_requests(server: RunningServer, image: Path) -> None:
    qemu_io(server,
            "write -P 0x5a 513 1000",
            "write -P 0x33 4095 2",
            "write -P 0x44 65535 70000",
            "write -z 65537 3",
            "read -P 0 0 513",
            "read -P 0x5a 513 1000",
            "read -P 0 1513 2582",
            "read -P 0x33 4095 2",
            "read -P 0x44 65535 2",
            "read -P 0 65537 3",
            "read -P 0x44 65540 69995",
            "read -v 511 5")
    server.stop()
    model = bytearray(16 * MiB)
    fill(model, 513, 1000, 0x5A)
    fill(model, 4095, 2, 0x33)
    fill(model, 65535, 70000, 0x44)
    fill(model, 65537, 3, 0)
    assert_image(image, model)
