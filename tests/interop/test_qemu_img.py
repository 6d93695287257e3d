"""qemu-img against the server: info, convert in and out, compare, and block-status maps."""

from __future__ import annotations

import random
import re
from pathlib import Path

from tests.interop._server import ImageFactory, MiB, RunningServer, ServeFactory, Transport
from tests.interop._tools import qemu_io, run, run_json


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_info_reports_size_and_raw_format(serve: ServeFactory, make_image: ImageFactory,
                                          transport: Transport) -> None:
    server = serve("-f", "raw", str(make_image(24 * MiB)), transport=transport)
    info = run_json(["qemu-img", "info", "--output=json", "-f", "raw", server.uri()],
                    server=server)
    assert info["virtual-size"] == 24 * MiB
    assert info["format"] == "raw"


def test_convert_in_then_compare_and_convert_out(
    serve: ServeFactory, make_image: ImageFactory, tmp_path: Path
) -> None:
    # Source with data, a zero run and a hole, so both the data and zero paths are used.
    src = make_image(8 * MiB, {0: random_bytes(1, 3 * MiB), 5 * MiB + 123: random_bytes(2, MiB),
                               7 * MiB: bytes(64 * 1024)})
    target = make_image(8 * MiB)
    server = serve("-f", "raw", str(target))
    run(["qemu-img", "convert", "-n", "-W", "-m", "4", "-f", "raw", "-O", "raw", str(src),
         server.uri()], server=server)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri()],
        server=server)

    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), str(out)],
        server=server)
    assert out.read_bytes() == src.read_bytes()
    server.stop()  # flushes: the image file itself must now hold the data
    assert target.read_bytes() == src.read_bytes()


def test_compare_notices_one_changed_byte(serve: ServeFactory, make_image: ImageFactory) -> None:
    data = random_bytes(3, 2 * MiB)
    src = make_image(4 * MiB, {0: data})
    copy = make_image(4 * MiB, {0: data})
    server = serve("-f", "raw", str(copy))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri()], server=server)
    qemu_io(server, f"write -P {data[777] ^ 0xff} 777 1")
    result = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri()],
                 server=server, expect_rc=1)
    assert "offset 777" in result.stdout or "Content mismatch" in result.stdout, result.stdout


def check_map_covers(entries: list[dict[str, int | bool]], size: int) -> None:
    position = 0
    for entry in entries:
        assert entry["start"] == position, entries
        assert isinstance(entry["length"], int) and entry["length"] > 0
        position += entry["length"]
    assert position == size, entries


def test_map_reports_data_and_zero_regions(serve: ServeFactory, make_image: ImageFactory) -> None:
    size = 16 * MiB
    data_start, data_end = 2 * MiB, 3 * MiB
    image = make_image(size, {data_start: b"\xaa" * (data_end - data_start)})
    server = serve("-f", "raw", str(image), transport="tcp")
    entries = run_json(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()],
                       server=server)
    check_map_covers(entries, size)
    for entry in entries:
        start, end = entry["start"], entry["start"] + entry["length"]
        overlaps_data = start < data_end and end > data_start
        if overlaps_data:
            assert entry["data"] and not entry["zero"], entries
    # The holes of a sparse file are reported as reading zero somewhere after the data.
    assert any(e["zero"] and e["start"] >= data_end for e in entries), entries


def test_map_after_zero_write_never_claims_zero_for_data(
    server: RunningServer,
) -> None:
    qemu_io(server, "write -P 0x11 0 1M", "write -z 256k 256k", "write -P 0x22 3M 4k")
    entries = run_json(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()],
                       server=server)
    check_map_covers(entries, 16 * MiB)
    nonzero = [(0, 256 * 1024), (512 * 1024, MiB), (3 * MiB, 3 * MiB + 4096)]
    for entry in entries:
        start, end = entry["start"], entry["start"] + entry["length"]
        for lo, hi in nonzero:
            if start < hi and end > lo:
                assert not entry["zero"], (entry, entries)


def test_qemu_nbd_list_client(serve: ServeFactory, image: Path) -> None:
    # qemu-nbd -L is qemu's own listing client: OPT_LIST, OPT_INFO and meta-context listing.
    server = serve("-f", "raw", "-A", "-D", "listed by qemu", str(image), export_name="disk")
    assert server.socket_path is not None
    out = run(["qemu-nbd", "-L", "-k", str(server.socket_path)], server=server).stdout
    assert "exports available: 1" in out, out
    assert "export: 'disk'" in out and "description: listed by qemu" in out, out
    assert re.search(rf"size:\s+{16 * MiB}\b", out), out
    assert "base:allocation" in out and "qemu:allocation-depth" in out, out
