"""Decompression of compressed clusters (written by ``qemu-img convert -c``).

zlib images hold raw deflate streams (no zlib header); decompression stops once one
cluster has been produced, because the stored length is rounded up to 512-byte sectors and
may include the start of the next cluster's stream.
"""

from __future__ import annotations

import errno
import importlib
import zlib

from ..types import Buffer
from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data: Buffer, cluster_size: int, compression_type: int) -> bytes:
    """Return exactly one cluster; ``OSError(EIO)`` if the stream is damaged or short."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            zstandard = importlib.import_module("zstandard")
            out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(data))
            out = out[:cluster_size]
        else:  # refused at open; kept as a guard
            raise OSError(errno.EIO, f"unknown compression type {compression_type}")
    except zlib.error as e:
        raise OSError(errno.EIO, f"corrupt compressed cluster: {e}") from e
    if len(out) != cluster_size:
        raise OSError(
            errno.EIO, f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out
