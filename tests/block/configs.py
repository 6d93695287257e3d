"""Node configurations every driver test runs over.

Adding a driver to the contract and model tests is one entry in ``CONFIGS``: a function
that, given a scratch directory, returns the graph options (a list, opened in order; the
last item is the node under test) -- async if it must create files first.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdserve.block import Graph, open_graph

SIZE = 4 << 20  # every configuration exports 4 MiB

Options = list[dict[str, Any]]


@dataclass(frozen=True)
class Config:
    name: str
    make: Callable[[Path], Awaitable[Options]]
    #: Writes are kept (False for ``null``, which drops them).
    stores: bool = True
    #: Run in the model-based random tests.
    model: bool = True


async def _memory(tmp: Path) -> Options:
    return [{"driver": "memory", "node-name": "top", "size": SIZE}]


async def _memory_overlay(tmp: Path) -> Options:
    return [
        {"driver": "memory", "node-name": "base", "size": SIZE - 100_000},
        {"driver": "memory", "node-name": "top", "size": SIZE, "backing": "base"},
    ]


async def _null(tmp: Path) -> Options:
    return [{"driver": "null", "node-name": "top", "size": SIZE}]


async def _raw_offset(tmp: Path) -> Options:
    return [
        {
            "driver": "raw",
            "node-name": "top",
            "offset": 12345,
            "size": SIZE,
            "file": {"driver": "memory", "size": SIZE + 20000},
        }
    ]


async def _blkdebug(tmp: Path) -> Options:
    # align and max-transfer force padding, read-modify-write and splitting above memory;
    # the zero-length delay rules make every request yield, so requests interleave.
    return [
        {
            "driver": "blkdebug",
            "node-name": "top",
            "align": 512,
            "max-transfer": 64 << 10,
            "inject-delay": [{"iotype": ["read", "write", "zero", "discard"], "ms": 0}],
            "image": {"driver": "memory", "size": SIZE},
        }
    ]


async def _file(tmp: Path) -> Options:
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        os.ftruncate(f.fileno(), SIZE)
    return [{"driver": "file", "node-name": "top", "filename": str(path)}]


async def _file_direct(tmp: Path) -> Options:
    # O_DIRECT on a fully allocated (zero-written) file: the alignment probe finds the
    # device's block size, so the generic layer pads and read-modify-writes above it.
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.write(bytes(SIZE))
    return [
        {"driver": "file", "node-name": "top", "filename": str(path), "cache.direct": True}
    ]


async def _raw_file(tmp: Path) -> Options:
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        os.ftruncate(f.fileno(), SIZE + 4096)
    return [
        {
            "driver": "raw",
            "node-name": "top",
            "offset": 4096,
            "file": {"driver": "file", "filename": str(path)},
        }
    ]


async def _qcow2(tmp: Path) -> Options:
    from nbdserve.block.qcow2 import create_qcow2

    path = tmp / "disk.qcow2"
    await create_qcow2(path, SIZE)
    return [
        {
            "driver": "qcow2",
            "node-name": "top",
            "file": {"driver": "file", "filename": str(path)},
        }
    ]


CONFIGS = [
    Config("memory", _memory),
    Config("memory-overlay", _memory_overlay),
    Config("null", _null, stores=False, model=False),
    Config("raw-offset", _raw_offset),
    Config("blkdebug", _blkdebug),
    Config("file", _file),
    Config("file-direct", _file_direct),
    Config("raw-file", _raw_file),
    Config("qcow2", _qcow2),
]


async def open_config(config: Config, tmp: Path) -> Graph:
    return await open_graph(await config.make(tmp))
