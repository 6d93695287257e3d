"""Creating new qcow2 images (what ``qemu-img create -f qcow2`` does).

Layout, like qemu-img's: cluster 0 holds the header, its extensions and the backing file
name; then the refcount table, the L1 table, and the refcount blocks describing all of them.
The image is v3 (compat 1.1) with 16-bit refcounts unless ``compat="0.10"`` is asked for.
"""

from __future__ import annotations

import os
import struct

import trio

from .header import (
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    KNOWN_FEATURE_NAMES,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    Header,
)
from .tables import encode_entries

_V3_HEADER_LENGTH = 112  # the 104 mandatory bytes + compression_type, padded to 8


def _ext(kind: int, data: bytes) -> bytes:
    pad = -len(data) % 8
    return struct.pack(">II", kind, len(data)) + data + bytes(pad)


def _feature_table() -> bytes:
    return b"".join(
        struct.pack(">BB46s", kind, bit, name.encode())
        for (kind, bit), name in sorted(KNOWN_FEATURE_NAMES.items())
    )


def qcow2_image_bytes(
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compat: str = "1.1",
) -> bytes:
    """The complete contents of a new, empty qcow2 image (metadata only)."""
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not (
        MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    ):
        raise ValueError(f"cluster size {cluster_size} must be a power of two, 512 B to 2 MiB")
    if size < 0:
        raise ValueError("image size must not be negative")
    if compat not in ("0.10", "1.1"):
        raise ValueError(f"compat must be '0.10' or '1.1', not {compat!r}")
    if backing_fmt is not None and backing_file is None:
        raise ValueError("backing_fmt given without backing_file")
    # QEMU reads the size as whole 512-byte sectors (rounding down); qemu-img rounds a new
    # image's size up, and so do we, so that both see the same disk.
    size = -(-size // 512) * 512
    version = 3 if compat == "1.1" else 2
    header_length = _V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH

    # The header cluster: fixed header, extensions, then the backing file name.
    exts = b""
    if backing_fmt is not None:
        exts += _ext(EXT_BACKING_FORMAT, backing_fmt.encode())
    feature_table = _ext(EXT_FEATURE_TABLE, _feature_table()) if version == 3 else b""
    name = backing_file.encode() if backing_file is not None else b""
    if len(name) > MAX_BACKING_NAME:
        raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    end_ext = _ext(EXT_END, b"")
    if header_length + len(exts) + len(feature_table) + len(end_ext) + len(name) <= cluster_size:
        exts += feature_table  # only a help for error messages: dropped if it doesn't fit
    exts += end_ext
    if header_length + len(exts) + len(name) > cluster_size:
        raise ValueError("backing file name does not fit in the first cluster")

    l2_entries = cluster_size // 8
    l1_size = -(-size // (cluster_size * l2_entries))
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(
            f"image size {size} is too large for {cluster_size}-byte clusters "
            "(the L1 table would exceed 32 MiB); use a larger cluster size"
        )
    l1_clusters = -(-l1_size * 8 // cluster_size)  # 0 for an empty image
    per_block = cluster_size * 8 // 16
    per_table_cluster = cluster_size // 8
    # Fixpoint: the refcount table and blocks must describe themselves as well.
    rt_clusters, blocks = 1, 1
    while True:
        total = 1 + rt_clusters + l1_clusters + blocks
        need_blocks = -(-total // per_block)
        need_rt = max(1, -(-need_blocks // per_table_cluster))
        if (need_blocks, need_rt) == (blocks, rt_clusters):
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)

    rt_offset = cluster_size
    l1_offset = rt_offset + rt_clusters * cluster_size
    blocks_offset = l1_offset + l1_clusters * cluster_size
    header = Header(
        version=version,
        backing_file_offset=(header_length + len(exts)) if name else 0,
        backing_file_size=len(name),
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=4,
        header_length=header_length,
    )
    image = bytearray(blocks_offset + blocks * cluster_size)
    first = header.pack() + exts + name
    image[: len(first)] = first
    table = [blocks_offset + i * cluster_size for i in range(blocks)]
    image[rt_offset : rt_offset + 8 * blocks] = encode_entries(table)
    refcounts = struct.pack(">H", 1) * total
    image[blocks_offset : blocks_offset + len(refcounts)] = refcounts
    return bytes(image)


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


async def create_qcow2(
    path: str | os.PathLike[str],
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compat: str = "1.1",
) -> None:
    """Create (or overwrite) a qcow2 image at ``path``; ``size`` is rounded up to a
    multiple of 512 bytes, as qemu-img does.

    ``backing_file`` is stored as given: a relative name is resolved against the image's
    directory when the image is opened, as QEMU does. Raises ``ValueError`` for bad
    parameters and ``OSError`` if the file cannot be written.
    """
    data = qcow2_image_bytes(
        size,
        cluster_size=cluster_size,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        compat=compat,
    )
    await trio.to_thread.run_sync(_write_new, os.fspath(path), data)
