"""Meta contexts: base:allocation and qemu:allocation-depth over a raw image and a qcow2 chain.

Images are built with qemu-img and qemu-io directly on the files, so the expected layout is
QEMU's own; both servers must then report it the same way over NBD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.interop._server import MiB, RunningServer, ServeFactory
from tests.interop._tools import nbdinfo_json, qemu_io, run

SIZE = 16 * MiB


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x0b 0 1M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x07 1M 1M", "-c", "write -z 3M 64k",
         str(top)])
    return top


def nbdinfo_map(server: RunningServer, context: str) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", f"--map={context}", "--json", server.uri()], server=server).stdout
    entries: list[dict[str, Any]] = json.loads(out)
    return [(e["offset"], e["length"], e["type"]) for e in entries]


def flags_at(extents: list[tuple[int, int, int]], offset: int) -> int:
    for start, length, flags in extents:
        if start <= offset < start + length:
            return flags
    raise AssertionError(f"no extent covers {offset}: {extents}")


def test_overlay_reads_through_to_backing(serve: ServeFactory, chain: Path) -> None:
    server = serve("-f", "qcow2", "-A", str(chain))
    qemu_io(server, "read -P 0x0b 0 1M", "read -P 0x07 1M 1M", "read -P 0 2M 14M")


def test_allocation_depth_context(serve: ServeFactory, chain: Path) -> None:
    server = serve("-f", "qcow2", "-A", str(chain))
    export = nbdinfo_json(server)["exports"][0]
    assert set(export["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}
    depth = nbdinfo_map(server, "qemu:allocation-depth")
    assert sum(length for _, length, _ in depth) == SIZE
    assert flags_at(depth, 0) == 2                # from the backing file
    assert flags_at(depth, MiB + 4096) == 1       # written in the overlay
    assert flags_at(depth, 3 * MiB) == 1          # zeroed in the overlay: still allocated there
    assert flags_at(depth, 2 * MiB) == 0          # nowhere in the chain
    assert flags_at(depth, SIZE - 1) == 0


def test_base_allocation_over_the_chain(serve: ServeFactory, chain: Path) -> None:
    server = serve("-f", "qcow2", str(chain))
    extents = nbdinfo_map(server, "base:allocation")
    assert sum(length for _, length, _ in extents) == SIZE
    assert flags_at(extents, 0) == 0               # data (in the backing file)
    assert flags_at(extents, MiB) == 0             # data (in the overlay)
    assert flags_at(extents, 3 * MiB) & 2 == 2     # zero cluster reads as zero
    assert flags_at(extents, 8 * MiB) == 3         # unallocated: hole and zero


def test_without_a_flag_allocation_depth_is_not_offered(serve: ServeFactory,
                                                        chain: Path) -> None:
    server = serve("-f", "qcow2", str(chain))
    assert "qemu:allocation-depth" not in nbdinfo_json(server)["exports"][0]["contexts"]


def test_allocation_depth_of_a_raw_image_is_one_layer(serve: ServeFactory,
                                                       tmp_path: Path) -> None:
    # A protocol-level image has no backing chain: QEMU counts all of it as local (depth 1),
    # holes included.
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"\x01" * MiB)
    server = serve("-f", "raw", "-A", str(image))
    assert nbdinfo_map(server, "qemu:allocation-depth") == [(0, SIZE, 1)]
