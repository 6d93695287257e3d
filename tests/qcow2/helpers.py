"""Shared helpers for the qcow2 tests: qemu tools, opening images, comparing maps."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbdserve.block import Child, Graph, Perm, Status, open_graph

RW = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=check, timeout=120
    )


def qemu_img_create(path: Path, size: str | int, *opts: str, backing: Path | None = None,
                    backing_fmt: str = "qcow2") -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    for o in opts:
        args += ["-o", o]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    run(*args, path, str(size))
    return path


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, path)
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr


def raw_of(path: Path, tmp: Path) -> bytes:
    """What qemu reads from the image (the whole chain), via ``qemu-img convert -O raw``."""
    out = tmp / (path.name + ".ref.raw")
    run("qemu-img", "convert", "-O", "raw", path, out)
    return out.read_bytes()


def qemu_map(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(run("qemu-img", "map", "--output=json", path).stdout))


def check_image(path: Path) -> dict[str, Any]:
    """``qemu-img check`` as JSON; returns it (exit status 0 clean, 3 leaks, 2 corrupt)."""
    res = run("qemu-img", "check", "--output=json", path, check=False)
    assert res.returncode in (0, 2, 3), res.stderr
    info: dict[str, Any] = json.loads(res.stdout)
    info["returncode"] = res.returncode
    return info


async def open_image(
    path: Path, *, writable: bool = False, extra: dict[str, Any] | None = None
) -> tuple[Graph, Child]:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": "img",
        "discard": "unmap",
        "read-only": not writable,
        "file": {"driver": "file", "filename": str(path)},
    }
    opts.update(extra or {})
    graph = await open_graph([opts])
    perm = RW if writable else Perm.CONSISTENT_READ
    return graph, graph.attach("img", perm=perm, shared=Perm.ALL, user="test")


def split_points(*maps: Sequence[tuple[int, int, Any]]) -> list[int]:
    points: set[int] = set()
    for m in maps:
        for start, length, _ in m:
            points.add(start)
            points.add(start + length)
    return sorted(points)


def lookup(m: Sequence[tuple[int, int, Any]], pos: int) -> Any:
    for start, length, value in m:
        if start <= pos < start + length:
            return value
    raise AssertionError(f"no extent at {pos}")


async def our_map(child: Child) -> list[tuple[int, int, tuple[bool, bool, int | None]]]:
    """(start, length, (data, zero, offset-at-start)) from the block layer's chain status."""
    out = []
    pos = 0
    for e in await child.block_status(0, child.size):
        offset = e.map_offset if e.status & Status.OFFSET_VALID else None
        out.append((pos, e.length, (bool(e.status & Status.DATA), bool(e.status & Status.ZERO),
                                    offset)))
        pos += e.length
    return out


def their_map(path: Path) -> list[tuple[int, int, tuple[bool, bool, int | None]]]:
    return [
        (e["start"], e["length"], (e["data"], e["zero"], e.get("offset")))
        for e in qemu_map(path)
    ]


def assert_same_map(ours: list[tuple[int, int, Any]], theirs: list[tuple[int, int, Any]]) -> None:
    """Equal data/zero flags everywhere and equal host offsets, compared piece by piece
    (the two sides may cut extents at different places)."""
    assert sum(x[1] for x in ours) == sum(x[1] for x in theirs)
    points = split_points(ours, theirs)
    for a in points[:-1]:
        mine, ref = lookup(ours, a), lookup(theirs, a)
        start_m = next(s for s, n, _ in ours if s <= a < s + n)
        start_t = next(s for s, n, _ in theirs if s <= a < s + n)
        off_m = None if mine[2] is None else mine[2] + a - start_m
        off_t = None if ref[2] is None else ref[2] + a - start_t
        assert (mine[0], mine[1], off_m) == (ref[0], ref[1], off_t), f"at offset {a}"
