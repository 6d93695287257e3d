"""The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header").

Parsing validates everything the rest of the driver relies on, so a malformed or
unsupported image fails at open with a message that says what is wrong, never later with a
confusing I/O error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"QFI\xfb"

#: Fields common to v2 and v3 (72 bytes), then the v3 additions (32 bytes).
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
V2_HEADER_LENGTH = _V2.size  # 72
V3_HEADER_LENGTH = _V2.size + _V3.size  # 104

# Offsets of fields the driver rewrites in place (one small write each).
OFF_SIZE = 24  # size (8), crypt_method (4), l1_size (4), l1_table_offset (8): 24 bytes
OFF_REFCOUNT_TABLE = 48  # refcount_table_offset (8), refcount_table_clusters (4)
OFF_AUTOCLEAR = 88

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's limit
MAX_BACKING_NAME = 1023
#: QEMU's implementation limits; images beyond them are refused (and never created).
MAX_L1_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20

#: Names for the feature bits we know, used in messages and written into new images.
KNOWN_FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}


class Qcow2FormatError(ValueError):
    """The image is not a qcow2 image we can open (malformed or unsupported)."""


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    #: (type, bit) -> name, from the feature-name table extension.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: Extension types present, in order (the bitmaps and crypto ones matter for checks).
    extensions: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack(self) -> bytes:
        """The fixed part of the header (72 bytes for v2, ``header_length`` for v3)."""
        out = _V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return out
        out += _V3.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        tail = bytearray(self.header_length - V3_HEADER_LENGTH)
        if tail:
            tail[0] = self.compression_type
        return out + bytes(tail)

    def feature_name(self, kind: int, bit: int) -> str:
        name = self.feature_names.get((kind, bit)) or KNOWN_FEATURE_NAMES.get((kind, bit))
        return f"{name!r} (bit {bit})" if name else f"unknown feature bit {bit}"


def _u32(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off : off + 4], "big")


def parse_header(buf: bytes) -> Header:
    """Parse the header, its extensions and the backing file name from the first cluster.

    ``buf`` must hold at least the whole first cluster (or the whole file, if shorter).
    Raises :class:`Qcow2FormatError` for anything malformed; feature support is judged
    separately by :func:`check_supported`.
    """
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise Qcow2FormatError("not a qcow2 image (bad magic)")
    fields = _V2.unpack_from(buf)
    version = fields[1]
    if version not in (2, 3):
        raise Qcow2FormatError(f"unsupported qcow2 version {version} (only 2 and 3 exist)")
    h = Header(version, *fields[2:])
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2FormatError(
            f"cluster size 2**{h.cluster_bits} out of range (512 B to 2 MiB supported)"
        )
    cs = h.cluster_size
    if version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise Qcow2FormatError("truncated v3 header")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8:
            raise Qcow2FormatError(f"invalid header_length {h.header_length}")
        if h.header_length > min(cs, len(buf)):
            raise Qcow2FormatError(f"header_length {h.header_length} exceeds the first cluster")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
        if h.refcount_order > 6:
            raise Qcow2FormatError(f"refcount_order {h.refcount_order} > 6")
    for name, off, entries in (
        ("L1 table", h.l1_table_offset, h.l1_size),
        ("refcount table", h.refcount_table_offset, h.refcount_table_clusters),
    ):
        if off % cs or (off == 0 and entries):
            raise Qcow2FormatError(f"{name} offset {off:#x} is not a non-zero cluster boundary")
    if h.refcount_table_clusters == 0:
        raise Qcow2FormatError("refcount table has no clusters")
    if h.refcount_table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES:
        raise Qcow2FormatError("refcount table is larger than 8 MiB")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2FormatError("L1 table is larger than 32 MiB")
    l2_span = cs * (cs // 8)
    if h.l1_size * l2_span < h.size:
        raise Qcow2FormatError(
            f"L1 table ({h.l1_size} entries) too small for the virtual size {h.size}"
        )
    _parse_extensions(h, buf)
    if h.backing_file_offset:
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_size > MAX_BACKING_NAME or end > min(cs, len(buf)):
            raise Qcow2FormatError("backing file name is too long or outside the first cluster")
        raw = buf[h.backing_file_offset : end]
        try:
            h.backing_file = raw.decode()
        except UnicodeDecodeError as e:
            raise Qcow2FormatError("backing file name is not valid UTF-8") from e
    return h


def _parse_extensions(h: Header, buf: bytes) -> None:
    off = h.header_length
    limit = min(h.cluster_size, len(buf))
    seen: set[int] = set()
    while True:
        if off + 8 > limit:
            raise Qcow2FormatError("header extension area runs past the first cluster")
        kind, length = _u32(buf, off), _u32(buf, off + 4)
        off += 8
        if kind == EXT_END:
            return
        if off + length > limit:
            raise Qcow2FormatError(f"header extension {kind:#x} runs past the first cluster")
        data = bytes(buf[off : off + length])
        off += (length + 7) & ~7
        if kind in seen:
            raise Qcow2FormatError(f"header extension {kind:#x} appears twice")
        seen.add(kind)
        h.extensions.append(kind)
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = data.decode(errors="replace")
        elif kind == EXT_DATA_FILE:
            h.data_file = data.decode(errors="replace")
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, length - length % 48, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode(errors="replace")
                h.feature_names[(ftype, bit)] = name


def zstd_available() -> bool:
    try:
        import zstandard  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def check_supported(h: Header, *, writable: bool) -> None:
    """Refuse, with a clear message, any image whose features this driver cannot honour."""
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = ", ".join(h.feature_name(0, b) for b in range(64) if unknown >> b & 1)
        raise Qcow2FormatError(f"image uses unsupported incompatible features: {names}")
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))
        raise Qcow2FormatError(f"encrypted qcow2 images ({kind}) are not supported")
    if h.incompatible_features & INCOMPAT_DATA_FILE or h.data_file is not None:
        raise Qcow2FormatError("qcow2 images with an external data file are not supported")
    if h.incompatible_features & INCOMPAT_EXTL2:
        raise Qcow2FormatError(
            "qcow2 images with extended L2 entries (subclusters) are not supported"
        )
    if h.incompatible_features & INCOMPAT_COMPRESSION or h.compression_type:
        if h.compression_type != COMPRESSION_ZSTD:
            raise Qcow2FormatError(f"unknown compression type {h.compression_type}")
        if not zstd_available():
            raise Qcow2FormatError(
                "image uses zstd compression but the 'zstandard' module is not installed"
            )
    if writable:
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise Qcow2FormatError(
                "image is marked corrupt; open it read-only or repair it with "
                "'qemu-img check -r all'"
            )
        if h.incompatible_features & INCOMPAT_DIRTY:
            raise Qcow2FormatError(
                "image has the dirty bit set (lazy refcounts were in use); repair it with "
                "'qemu-img check -r all' or open it read-only"
            )
