"""``nbdserve create``: make a qcow2 image, as ``qemu-img create -f qcow2`` does.

    nbdserve create [-o cluster_size=SIZE,compat=0.10|1.1] [-b BACKING [-F FMT]] FILE [SIZE]

SIZE may be left out when a backing file gives it. The image is written by the same qcow2
code that serves it (:func:`nbdserve.block.qcow2.create_qcow2`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from .errors import ConfigError
from .sizes import parse_size

PROG = "nbdserve create"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Create a qcow2 image.")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="cluster_size=SIZE (512 to 2M, default 64K), compat=0.10|1.1")
    p.add_argument("-b", "--backing", metavar="BACKING",
                   help="backing file, stored as given (relative names are relative to FILE)")
    p.add_argument("-F", "--backing-format", choices=("raw", "qcow2"), metavar="FMT",
                   help="format of the backing file: raw or qcow2 (probed when absent)")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?",
                   help="virtual size, e.g. 10G (default: the backing file's size)")
    return p


def _image_options(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in ",".join(items).split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in ("cluster_size", "compat"):
            raise ConfigError(f"invalid option {item!r}: expected cluster_size=SIZE or "
                              "compat=0.10|1.1")
        out[key] = value
    return out


async def _backing_size(path: str, fmt: str | None) -> int:
    from .block import open_graph

    driver = fmt or ("qcow2" if _is_qcow2(path) else "raw")
    graph = await open_graph([{"driver": driver, "node-name": "backing", "read-only": True,
                               "file": {"driver": "file", "filename": path,
                                        "read-only": True, "locking": "off"}}])
    try:
        return graph.node("backing").size
    finally:
        await graph.close()


def _is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


async def _create(ns: argparse.Namespace) -> None:
    from .block.qcow2 import create_qcow2

    opts = _image_options(ns.options)
    cluster_size = parse_size(opts.get("cluster_size", "64K"), what="cluster_size")
    compat = opts.get("compat", "1.1")
    if ns.size is not None:
        size = parse_size(ns.size)
    elif ns.backing is not None:
        # A relative backing name is relative to the new image, as qemu-img resolves it.
        where = os.path.join(os.path.dirname(os.path.abspath(ns.filename)), ns.backing)
        size = await _backing_size(where, ns.backing_format)
    else:
        raise ConfigError("missing SIZE (needed when there is no backing file)")
    await create_qcow2(ns.filename, size, cluster_size=cluster_size, backing_file=ns.backing,
                       backing_fmt=ns.backing_format, compat=compat)


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        trio.run(_create, ns)
    except (ConfigError, ValueError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0
