"""libnbd's tools against the server: nbdinfo (--json, --list, --map, --can) and nbdcopy."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

from tests.interop._server import ImageFactory, MiB, ServeFactory, Transport
from tests.interop._tools import nbdinfo_json, run

HOLE, ZERO = 1, 2  # NBD_STATE_HOLE, NBD_STATE_ZERO in base:allocation


def only_export(info: dict[str, Any]) -> dict[str, Any]:
    exports: list[dict[str, Any]] = info["exports"]
    assert len(exports) == 1, info
    return exports[0]


def test_nbdinfo_json_describes_a_writable_export(serve: ServeFactory, make_image: ImageFactory,
                                                  transport: Transport) -> None:
    server = serve("-f", "raw", str(make_image(32 * MiB)), transport=transport)
    info = nbdinfo_json(server)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    export = only_export(info)
    assert export["export-name"] == ""
    assert export["export-size"] == 32 * MiB
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    # TRIM and CACHE are offered even with the default --discard=ignore, as qemu-nbd does.
    for capability in ("can_flush", "can_fua", "can_zero", "can_df", "can_trim", "can_cache"):
        assert export[capability] is True, (capability, export)
    minimum, preferred, maximum = (export[f"block_size_{k}"]
                                   for k in ("minimum", "preferred", "maximum"))
    assert 1 <= minimum <= preferred <= maximum
    assert maximum >= MiB


def test_nbdinfo_list_shows_name_and_description(serve: ServeFactory, image: Path) -> None:
    server = serve("-f", "raw", "-D", "scratch disk for tests", str(image), export_name="disk")
    # --list asks with any name; the listing must name the real export.
    listing = nbdinfo_json(server, "--list", uri=server.uri(export=""))
    export = only_export(listing)
    assert export["export-name"] == "disk"
    assert export["description"] == "scratch disk for tests"
    assert export["export-size"] == 16 * MiB


def test_wrong_export_name_is_refused_and_server_lives_on(serve: ServeFactory,
                                                          image: Path) -> None:
    server = serve("-f", "raw", str(image), export_name="disk")
    result = run(["nbdinfo", "--size", server.uri(export="nope")], server=server, expect_rc=1)
    assert result.stderr.strip(), "a refused export should come with a message"
    assert run(["nbdinfo", "--size", server.uri()], server=server).stdout.strip() == str(16 * MiB)


def test_nbdinfo_map_of_sparse_image(serve: ServeFactory, make_image: ImageFactory) -> None:
    image = make_image(16 * MiB, {MiB: b"\x01" * MiB})
    server = serve("-f", "raw", str(image))
    extents = run(["nbdinfo", "--map", "--json", server.uri()], server=server).stdout
    entries: list[dict[str, Any]] = json.loads(extents)
    position = 0
    for entry in entries:
        assert entry["offset"] == position, entries
        position += entry["length"]
        overlaps_data = entry["offset"] < 2 * MiB and entry["offset"] + entry["length"] > MiB
        if overlaps_data:
            assert entry["type"] & ZERO == 0, entries
    assert position == 16 * MiB
    assert any(e["type"] == HOLE | ZERO and e["offset"] >= 2 * MiB for e in entries), entries


def test_nbdinfo_can_and_is(serve: ServeFactory, image: Path) -> None:
    server = serve("-f", "raw", "--discard=unmap", str(image))
    for feature in ("connect", "read", "write", "flush", "fua", "trim", "zero"):
        run(["nbdinfo", "--can", feature, server.uri()], server=server, expect_rc=0)
    run(["nbdinfo", "--is", "read-only", server.uri()], server=server, expect_rc=2)


def test_nbdcopy_in_and_out(serve: ServeFactory, make_image: ImageFactory,
                            tmp_path: Path) -> None:
    rng = random.Random(7)
    size = 24 * MiB
    src = make_image(size, {0: rng.randbytes(4 * MiB), 9 * MiB + 17: rng.randbytes(3 * MiB),
                            20 * MiB: rng.randbytes(MiB)})
    target = make_image(size)
    server = serve("-f", "raw", str(target), transport="tcp")
    run(["nbdcopy", "--flush", str(src), server.uri()], server=server)
    out = tmp_path / "copied-out.img"
    run(["nbdcopy", server.uri(), str(out)], server=server)
    expected = src.read_bytes()
    assert out.read_bytes() == expected
    # And a second, synchronous copy out: one request at a time, another code path in nbdcopy.
    out2 = tmp_path / "copied-out-sync.img"
    run(["nbdcopy", "--synchronous", "--no-extents", server.uri(), str(out2)], server=server)
    assert out2.read_bytes() == expected
    server.stop()
    assert target.read_bytes() == expected


def test_copy_out_of_an_image_in_memory(serve: ServeFactory, tmp_path: Path) -> None:
    # On a memory filesystem nbdserve sends reads of 64 KiB or more with sendfile; a read
    # that starts in a hole is still answered with holes (the image has both).
    rng = random.Random(11)
    data = {0: rng.randbytes(5 * MiB + 4096), 9 * MiB + 65536: rng.randbytes(3 * MiB)}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = Path(shm) / "disk.img"
        with open(src, "wb") as f:
            f.truncate(16 * MiB)
            for offset, chunk in data.items():
                f.seek(offset)
                f.write(chunk)
        server = serve("-f", "raw", "-r", str(src))
        try:
            out = tmp_path / "copied-out.img"
            run(["nbdcopy", "--no-extents", server.uri(), str(out)], server=server)
            assert out.read_bytes() == src.read_bytes()
            run(["qemu-img", "compare", "-f", "raw", str(src), server.uri()], server=server)
        finally:
            server.stop()


def test_nbdcopy_between_two_exports(serve: ServeFactory, make_image: ImageFactory) -> None:
    rng = random.Random(11)
    src = make_image(8 * MiB, {MiB: rng.randbytes(2 * MiB), 6 * MiB: rng.randbytes(12345)})
    dst = make_image(8 * MiB, {0: b"\xff" * (8 * MiB)})
    source = serve("-f", "raw", "-r", str(src))
    target = serve("-f", "raw", str(dst))
    run(["nbdcopy", source.uri(), target.uri()], server=target)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.uri()],
        server=target)
